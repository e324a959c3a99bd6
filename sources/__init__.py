"""Each data source's converter to the one LMDB format data.py reads (lmdb_store.py): PhraseCut, RefCOCO/+/g,
COCO and VOC category prompts, and the bundled synthetic set; build.py is `python data.py build`'s."""
