"""helpers/transforms.py's tokens: exactly clip.tokenize's for every phrase the model can read (and for long phrases
of ordinary words), in work bounded by word_len whatever the phrase: CLIP's BPE takes time that grows faster than a
word's length (100,000 letters took 57 s, a megabyte about 25 minutes), so it must never see more than
max_word_bytes of a word, nor the cleaning more than max_phrase_chars of a phrase."""
import random

import pytest
import torch

from helpers import transforms
from helpers.clip_weights import clip

TOKENIZER = clip.clip._tokenizer

PHRASES = ["red circle", "", "   ", "the small red circle to the left of the big blue square", "word " * 50,
           "café rouge ☕ 猫", "日本語の文章です" * 3, "A &amp; B &lt;c&gt; &#65;&#x42;", "tab\tand\nnew line  spaces",
           "\x1b[31mred\x1b[0m square", "it's the man's hat, isn't it?", "123 4567 89", "😂" * 40, "🇫🇷🇩🇪 flags",
           "supercalifragilisticexpialidocious" * 3, "<|endoftext|> after", "ÃƒÂ© mojibake", "x" * 600,
           "p" + "ü" * 150, "a-b_c.d/e:f;g", "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ", "ﬁne ligature"]


def clip_tokens(phrases, word_len):
    return clip.tokenize(phrases, context_length=word_len, truncate=True).long()


def clip_kept_words(phrase, word_len):
    """kept_words as it was, on CLIP's whole encode."""
    ids = TOKENIZER.encode(phrase)
    if len(ids) <= word_len - 2:
        return None
    text = "".join(TOKENIZER.decoder[i] for i in ids[:word_len - 2])
    return bytearray(TOKENIZER.byte_decoder[c] for c in text).decode("utf-8", errors="ignore").replace("</w>", " ").strip()


def test_the_longest_token_of_clips_vocabulary():
    tokens = [t.replace("</w>", "") for t in TOKENIZER.encoder if t not in ("<|startoftext|>", "<|endoftext|>")]
    assert max(map(len, tokens)) == transforms.LONGEST_TOKEN  # byte-level symbols: one per UTF-8 byte
    assert transforms.max_word_bytes(22) == 20 * 32 + 1 and transforms.max_phrase_chars(22) == 16 * 20 * 33


@pytest.mark.parametrize("word_len", [3, 8, 22, 77])
def test_tokens_and_kept_words_are_clips(word_len):
    rng = random.Random(word_len)
    alphabet = "abcdefghij klmnop é猫😂&;#.,'-\t\n" + "x" * 10
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400))) for _ in range(150)]
    readable = [p for p in PHRASES + fuzz + [w[:k] for w in fuzz for k in (2, 5, 20)] if len(TOKENIZER.encode(p)) <=
                word_len - 2]
    assert len(readable) > 20
    for phrases in (PHRASES, fuzz, readable):
        assert torch.equal(transforms.tokenize(phrases, word_len), clip_tokens(phrases, word_len))
        for phrase in phrases:
            assert transforms.kept_words(phrase, word_len) == clip_kept_words(phrase, word_len), phrase


def test_the_longest_readable_words_are_read_whole():
    """Words at the bound: runs of an emoji that CLIP merges eight at a time, as long as word_len 22 still reads."""
    bound = transforms.max_word_bytes(22)
    for n in range(120, 161):
        phrase = "😂" * n
        assert torch.equal(transforms.tokenize(phrase, 22), clip_tokens([phrase], 22)), n
        assert (transforms.kept_words(phrase, 22) is None) == (len(TOKENIZER.encode(phrase)) <= 20)
    assert len(("😂" * 160).encode()) < bound and len(TOKENIZER.encode("😂" * 161)) > 20


@pytest.fixture
def bpe_inputs(monkeypatch):
    """What CLIP's BPE and its text cleaning are given, recorded: ([bytes of each word], [length of each text]).
    An input over the bounds of word_len 77 fails at once, rather than after the minutes BPE would take on it."""
    words, texts = [], []
    bpe, clean = TOKENIZER.bpe, clip.simple_tokenizer.basic_clean

    def spy(record, function, most):
        def recorded(text):
            record.append(len(text))
            assert len(text) <= most, f"{len(text):,} characters given to CLIP's {function.__name__}"
            return function(text)
        return recorded
    monkeypatch.setattr(TOKENIZER, "bpe", spy(words, bpe, transforms.max_word_bytes(77)))
    monkeypatch.setattr(clip.simple_tokenizer, "basic_clean", spy(texts, clean, transforms.max_phrase_chars(77)))
    return words, texts


@pytest.mark.parametrize("phrase", ["Z" + "q" * 99_999, "ab " * 350_000, "é" * 1_000_000, "\x01" * 999_999 + "x",
                                    "red circle " + "o" * 1_000_000])
def test_a_huge_phrase_costs_bounded_work(phrase, bpe_inputs):
    words, texts = bpe_inputs
    for word_len in (22, 77):
        words.clear(), texts.clear()
        kept = transforms.kept_words(phrase, word_len)
        tokens = transforms.tokenize(phrase, word_len)
        assert kept is not None and tokens.shape == (1, word_len)
        assert texts and max(texts) <= transforms.max_phrase_chars(word_len)
        assert max(words, default=0) <= transforms.max_word_bytes(word_len)
        assert len(words) <= 2 * (word_len - 1)  # kept_words and tokenize each stop after word_len - 1 tokens
    assert kept.startswith("red circle") or not phrase.startswith("red circle")


def test_a_readable_phrase_padded_with_a_megabyte_of_spaces_is_read_whole(bpe_inputs):
    phrase = "red" + " \n\t" * 333_333 + "circle"
    assert transforms.kept_words(phrase, 22) is None
    assert torch.equal(transforms.tokenize(phrase, 22), clip_tokens(["red circle"], 22))
    assert max(bpe_inputs[1]) == len("red circle")
