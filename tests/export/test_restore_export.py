"""Export from a saved checkpoint in a new model, without calibrating: byte-identical to the
export of the run that calibrated, and refused when the checkpoint has no (or other) state."""

import warnings

import pytest
import torch

import nvfp4_dist as nd
from export_testutil import export_contents
from nvfp4_dist.calib.checkpoint import save_dcp_checkpoint
from nvfp4_dist.calib.restore import restore
from nvfp4_dist.models.tiny import build_embedded, calibration_tokens

CONFIG = nd.QuantConfig(method="local_hessian", dss=True)


@pytest.mark.parametrize("model_name", ["tiny-dense", "tiny-moe"])
def test_export_from_a_dcp_checkpoint_equals_the_calibrating_runs_export(model_name, tmp_path):
    model = build_embedded(model_name, seed=0)
    tokens = calibration_tokens(model.config.vocab_size, 8, 32, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny-moe's dead experts; DCP in one process
        result = nd.quantize(model, CONFIG, lambda m: [m(b) for b in tokens.split(4)], show_progress=False)
        with torch.no_grad():  # "training" after calibration: the checkpoint holds other weights
            model.model.layers[0].self_attn.o_proj.weight.mul_(1.01)
        nd.export_checkpoint(model, result, tmp_path / "calibrated", fmt="compressed-tensors")
        save_dcp_checkpoint(model, tmp_path / "ckpt")

        fresh = build_embedded(model_name, seed=1)  # other weights: all of them come from the checkpoint
        restored = restore(fresh, CONFIG, dcp_checkpoint=tmp_path / "ckpt")
        nd.export_checkpoint(fresh, restored, tmp_path / "restored", fmt="compressed-tensors")
    assert export_contents(tmp_path / "restored") == export_contents(tmp_path / "calibrated")


def test_a_checkpoint_without_quantizer_state_or_with_other_settings_is_refused(tmp_path):
    plain = build_embedded("tiny-dense", seed=0)
    save_dcp_checkpoint(plain, tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(nd.ExportError, match=r"(?s)expected but absent:.*q_proj\.weight_nvfp4_\{.*block_scale"):
            restore(build_embedded("tiny-dense", seed=0), CONFIG, dcp_checkpoint=tmp_path / "plain")
        model = build_embedded("tiny-dense", seed=0)
        nd.quantize(model, nd.QuantConfig(method="max", quantize_inputs=False), show_progress=False)
        save_dcp_checkpoint(model, tmp_path / "w4a16")
        with pytest.raises(nd.ExportError, match=r"input_amax.*(?s:.*)weight-only \(W4A16\)"):
            restore(build_embedded("tiny-dense", seed=0), nd.QuantConfig(method="max"),
                    dcp_checkpoint=tmp_path / "w4a16")
