"""The evaluate stage: retrieval recall with the papers' protocol.

`protocol` measures R@1/5/10 both ways (ITC top-k re-scored by ITM, the rest below), keeping its
pair scores and image states in the collection folder; `flickr30k` reads the Flickr30K and MSCOCO
Karpathy splits and measures them end to end; `captions` measures a collection's own caption
pairs; `calibration` judges the match probability; `report` writes the HTML page.

May import: the collection facade and every stage below it. Not serve or the CLI.
"""
