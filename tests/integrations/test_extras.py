"""An integration whose package is missing says so in one line naming the install command."""
import importlib
import sys

import pytest

from compress.integrations import MissingExtra


@pytest.mark.parametrize("module,hidden,extra", [
    ("compress.integrations.transformers", ["transformers"], "hf"),
    ("compress.integrations.lightning", ["lightning", "lightning.pytorch", "pytorch_lightning"], "lightning"),
])
def test_missing_extra_is_one_line(monkeypatch, module, hidden, extra):
    monkeypatch.delitem(sys.modules, module, raising=False)
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry raises ImportError
    with pytest.raises(ImportError) as err:
        importlib.import_module(module)
    assert isinstance(err.value, MissingExtra)
    assert str(err.value) == (f"{module} needs the optional package {hidden[-1] if extra == 'lightning' else hidden[0]}: "
                              f"pip install 'compress[{extra}]'")
    assert "\n" not in str(err.value)
