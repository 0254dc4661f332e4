from vlm_post.data.datamodule import ExampleDataset, VLMDataModule
from vlm_post.data.schema import Example
from vlm_post.data.sources import DataSource

__all__ = ["DataSource", "Example", "ExampleDataset", "VLMDataModule"]
