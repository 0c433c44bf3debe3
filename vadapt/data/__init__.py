"""Data sources, splits, preprocessing and iterators behind ``vadapt.input_pipeline``.

One concept per module:

  sources.py     in-memory tables of (image, label) from tfds, an image folder, idx files (Fashion-
                 MNIST) or sklearn digits
  idx.py         the IDX file format of MNIST-style datasets, read with its header checked
  splits.py      split strings for local sources, class selection, few-shot and VTAB-1k subsets
  preprocess.py  per-family normalisation, train augmentation and eval resizing (stateless, seeded)
  iterators.py   deterministic, resumable, per-process train and padded eval tf.data pipelines
  device.py      prefetching host batches onto a device mesh

Use ``vadapt.input_pipeline`` as the public entry point.
"""
