"""Data sets: where their files come from, the prepared format, and what training reads.

``prepare`` turns any source into one prepared folder (``data/prepared``); training stages
only ever read that folder. One module per job, imported by name (nothing is re-exported
here, so each stage's imports say exactly which code it depends on):

* :mod:`mfm.data.meta`: ``meta.json`` (:class:`~mfm.data.meta.DatasetMeta`);
* :mod:`mfm.data.files`: which files are images (torch-free, for ``predict``);
* :mod:`mfm.data.sources`: the registry and one loader per data set family;
* :mod:`mfm.data.prepared`: the prepared on-disk format (arrays or manifests);
* :mod:`mfm.data.datasets`: the prepared splits as Datasets of uint8 images;
* :mod:`mfm.data.loaders`: batch order and per-sample seeds (exact resume, any worker count);
* :mod:`mfm.data.augment`: batched augmentation and standardisation on the device.
"""
