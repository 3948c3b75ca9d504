"""parallel/unsupported.py: TransformerEngine and grouped-GEMM families are refused, not skipped.

The stand-in classes carry the Megatron class names the refusal matches on (it never imports
TransformerEngine); excluding the modules keeps them in high precision knowingly.
"""

import pytest
from torch import nn

import nvfp4_dist as nd
from harness import run_ranks
from nvfp4_dist.errors import LayoutError


class TEGroupedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear_fc1 = nn.Linear(32, 64)


class TELayerNormColumnParallelLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(32, 32).weight.detach())


class _Model(nn.Module):
    def __init__(self, family):
        super().__init__()
        self.dense = nn.Linear(32, 32)
        self.block = family()


CONFIG = dict(method="mse", quantize_inputs=False)


@pytest.mark.parametrize("family,fix", [(TEGroupedMLP, "SequentialMLP experts"),
                                        (TELayerNormColumnParallelLinear, "local layer spec")])
def test_refused_with_the_alternative_then_kept_when_excluded(family, fix):
    with pytest.raises(LayoutError, match=fix) as err:
        nd.quantize(_Model(family), nd.QuantConfig(**CONFIG), show_progress=False)
    assert str(err.value).startswith(f"block: {family.__name__}") and "exclude 'block*'" in str(err.value)
    result = nd.quantize(_Model(family), nd.QuantConfig(**CONFIG, exclude=("block*",)), show_progress=False)
    assert [s.name for s in result.slots] == ["dense"] and "block" in result.ignored


def _virtual_pipeline_worker() -> list[str]:
    from megatron.core import parallel_state as ps

    from nvfp4_dist.launch import init_distributed
    from nvfp4_dist.parallel.megatron import check_no_virtual_pipeline, megatron_context

    init_distributed(timeout_s=60)
    ps.initialize_model_parallel(pipeline_model_parallel_size=2, create_gloo_process_groups=False)
    megatron_context()  # plain pipeline parallelism: accepted
    messages = []
    try:
        check_no_virtual_pipeline(chunks=2)  # a model given as a list of two chunks
    except LayoutError as exc:
        messages.append(str(exc))
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                                 create_gloo_process_groups=False)
    try:
        megatron_context()
    except LayoutError as exc:
        messages.append(str(exc))
    return messages


@pytest.mark.distributed
def test_virtual_pipeline_chunks_are_refused_by_name():
    """PP=2 (real megatron-core, gloo) is accepted; virtual pipeline chunks (a list of model
    chunks, or virtual_pipeline_model_parallel_size set) are refused in one line naming the limit."""
    pytest.importorskip("megatron.core")
    for messages in run_ranks(_virtual_pipeline_worker, 2):
        assert len(messages) == 2
        assert messages[0].startswith("virtual pipeline parallelism (2 model chunk(s)")
        assert messages[1].startswith("virtual pipeline parallelism (1 model chunk(s), virtual pipeline size 2)")
        assert all("one model chunk per pipeline stage" in m and "\n" not in m for m in messages)
