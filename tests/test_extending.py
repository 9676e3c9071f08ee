"""What the contributor's guide (README "Extending") promises: a new scale encoding, a new method and a new model
family each plug in through one registration, with no other file changed."""
from dataclasses import replace

import torch

from configs import load_config
from conftest import tiny_llama
from quant_layers import IntElement, IntQuantizer, Scheme, make_quantizer
from quant_layers.schemes import SCALES, register_scale
from utils import adapters, methods
from utils.calibrate import quantize
from utils.pipeline import CalibrationReport


def test_a_new_scale_encoding(monkeypatch):
    """Power-of-two INT scales, as a toy: one builder and one register_scale call."""
    monkeypatch.setattr("quant_layers.schemes.SCALES", dict(SCALES))

    def power_of_two(scheme, x):
        minmax = make_quantizer(Scheme(scheme.element, scheme.granularity, scheme.group_size), x)
        return IntQuantizer(scheme.element.bits, scale=torch.exp2(torch.ceil(torch.log2(minmax.scale))))
    register_scale("power_of_two", IntElement, power_of_two)
    w = torch.randn(8, 32)
    quantizer = make_quantizer(Scheme(IntElement(4), "row", scale="power_of_two"), w)
    assert torch.equal(torch.log2(quantizer.scale), torch.log2(quantizer.scale).round())
    assert (quantizer(w) - w).abs().max() <= quantizer.scale.max() / 2 + 1e-6


def test_a_new_method(monkeypatch, calib_ids):
    """A method registered under a new name runs behind quantize(), the entry point the CLI uses too."""
    monkeypatch.setattr(methods.base, "METHODS", dict(methods.METHODS))
    seen = {}

    @methods.register_method("toy")
    class Toy(methods.Method):
        def quantize(self, model, config, calib, adapter, files, **kwargs):
            seen.update(config=config.name, windows=calib.shape[0], files=files)
            return CalibrationReport(layers={"toy": {}})

    config = replace(load_config("MinMax_config_llama"), name="toy_config", method="toy")
    report = quantize(tiny_llama(), config, calib_ids)
    assert report.layers == {"toy": {}} and seen == {"config": "toy_config", "windows": 4, "files": None}
    assert "toy" in methods.available()


def test_an_unknown_method_is_refused_naming_the_registered_ones(calib_ids):
    config = replace(load_config("MinMax_config_llama"), method="nonesuch")
    try:
        quantize(tiny_llama(), config, calib_ids)
    except methods.UsageError as error:
        assert "nonesuch" in str(error) and "fpq" in str(error) and "flatquant" in str(error)
    else:
        raise AssertionError("an unknown method ran")


def test_a_new_family_is_one_adapter_entry(monkeypatch, calib_ids):
    """A LLaMA-shaped model under another model_type: refused with the way to add it, then one entry runs it."""
    model = tiny_llama()
    model.config.model_type = "my_llama"
    try:
        adapters.adapter_for(model)
    except adapters.UnsupportedModel as error:
        assert "ADAPTERS in utils/adapters.py" in str(error)
    else:
        raise AssertionError("an unknown family was accepted")
    monkeypatch.setitem(adapters.ADAPTERS, "my_llama", adapters.LLAMA_LIKE)
    report = quantize(model, load_config("MinMax_config_llama"), calib_ids, progress=False)
    assert len([path for path in report.layers if path.startswith("model.layers.")]) == 2 * 7
