"""One reader per raw dataset layout (docs/datasets.md); each carries its dataset's constants."""
