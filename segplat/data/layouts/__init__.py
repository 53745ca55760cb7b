"""One reader per raw dataset layout (../shared/DATASETS.md); each carries its dataset's constants."""
