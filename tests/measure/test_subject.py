"""The batches rows are measured on."""
import torch
from torch.utils.data import DataLoader

from compress.data import DataBundle
from compress.data.inputs import Inputs
from compress.measure.subject import batch_of


def test_batch_of_repeats_named_inputs_to_the_batch_size():
    rows = [(Inputs(input_ids=torch.full((5,), i), attention_mask=torch.ones(5, dtype=torch.long)), 0) for i in range(3)]
    data = DataBundle.from_loaders(DataLoader(rows, batch_size=3), num_outputs=2)
    x = batch_of(data, 8)
    assert x["input_ids"].shape == x["attention_mask"].shape == (8, 5)
    assert x["input_ids"][:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
