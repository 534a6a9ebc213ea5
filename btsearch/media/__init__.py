"""The media stage: what people give btsearch, read into Python values: image files into RGB
pictures (`images`), their EXIF facts (`photo_facts`), batches of them on background threads
(`loader`), webdataset shards and parquet tables (`sources`), and files of texts (`text_files`).

May import: `btsearch.errors`, `btsearch.defaults`. Nothing of the model, storage or above.
"""
