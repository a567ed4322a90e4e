"""Data shipped with spurgen: ``spurious_imagenet_classes.tsv``, Spurious ImageNet's 100 classes with their spurious
features and neural PCA components (Neuhaus et al., ICCV 2023; MIT licence, see ``LICENSE-spurious_imagenet.txt``)."""
