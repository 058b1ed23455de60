"""Data sets behind one interface: Fashion-MNIST, scikit-learn digits and ImageNet-style class folders.

``datasets.build_datasets(DataConfig)`` returns the train, search and test splits; ``fashion_mnist`` reads the idx
files of the Debian package; ``listing`` lists an image folder in object storage once, for every process of a run.
"""
