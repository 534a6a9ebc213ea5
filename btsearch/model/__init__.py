"""The model stage: BridgeTower (and ManagerTower) split for retrieval.

Each tower runs alone to give a normalised ITC embedding and, when re-ranking needs them, the
bridge inputs of the cross-modal layers; the cross-modal encoder and its ITM head score a (text,
image) pair from those inputs. `Encoder` owns a checkpoint's processor and model on one device;
`convert` turns the papers' own checkpoints into folders `Encoder` loads.

May import: `btsearch.media` (reading pictures), `btsearch.errors`, `btsearch.defaults`. Nothing of
storage (`btsearch.indexers`), search, ingest or anything above them.
"""
