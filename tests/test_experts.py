"""The ``ep`` experts implementation: tokens dispatched to the ranks owning their experts equal a dense per-expert
loop over all experts, outputs and gradients, including an empty expert, every token on one expert, uneven splits."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed

E, H, I, TOP_K = 4, 8, 6, 2  # noqa: E741


def _experts(num_experts: int):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=num_experts, num_experts_per_tok=TOP_K)
    config._experts_implementation = "ep"
    return Qwen3MoeExperts(config)


def _routing(case: str, rank: int, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    if case == "one_expert":  # every token's top-k includes expert 3, the others pick from {0, 1}
        return torch.stack([torch.full((tokens,), 3), torch.randint(0, 2, (tokens,), generator=g)], dim=1)
    if case == "empty_expert":  # expert 2 gets no token from any rank
        pick = torch.tensor([0, 1, 3])
        return torch.stack([pick[torch.randperm(3, generator=g)[:TOP_K]] for _ in range(tokens)])
    return torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(tokens)])  # "random"


def _worker(rank: int, world: int, case: str, sharded_compiled: bool = False) -> dict:
    import torch.distributed as dist

    from veomni_lightning.parallel.experts import register_experts_implementation

    register_experts_implementation()
    torch.manual_seed(0)
    full = _experts(E)
    with torch.no_grad():
        full.gate_up_proj.normal_(0, 0.5)
        full.down_proj.normal_(0, 0.5)
    tokens = 5 + 3 * rank  # uneven: ranks route different numbers of tokens
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(rank))
    index = _routing(case, rank, tokens)
    weights = torch.rand(tokens, TOP_K, generator=torch.Generator().manual_seed(50 + rank))

    # Reference: transformers' own eager loop over all experts, on this rank's tokens.
    full.config._experts_implementation = "eager"
    x_ref, w_ref = x.clone().requires_grad_(), weights.clone().requires_grad_()
    ref = full(x_ref, index, w_ref)
    ref.pow(2).sum().backward()
    ref_grads = [full.gate_up_proj.grad.clone(), full.down_proj.grad.clone()]
    for g in ref_grads:
        dist.all_reduce(g)  # an expert's gradient comes from every rank's tokens

    # EP: this rank holds E / world experts.
    per = E // world
    local = _experts(E)
    with torch.no_grad():
        local.gate_up_proj = torch.nn.Parameter(full.gate_up_proj[rank * per : (rank + 1) * per].clone())
        local.down_proj = torch.nn.Parameter(full.down_proj[rank * per : (rank + 1) * per].clone())
    local.ep_group = dist.group.WORLD
    forward = local
    if sharded_compiled:  # as in training: expert weights are DTensors sharded over the ep mesh, blocks compiled
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        for name in ("gate_up_proj", "down_proj"):
            shard = getattr(local, name).detach()
            setattr(local, name, torch.nn.Parameter(DTensor.from_local(shard, mesh, [Shard(0)], run_check=False)))
        forward = torch.compile(local, backend="eager")
    x_ep, w_ep = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = forward(x_ep, index, w_ep)
    out.pow(2).sum().backward()
    mine = slice(rank * per, (rank + 1) * per)
    grads = [getattr(local, name).grad for name in ("gate_up_proj", "down_proj")]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:  # max error relative to the reference's largest entry
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    dist.barrier()  # no rank tears its process group down while another still exchanges (gloo aborts then)
    return {
        "out": rel(out, ref),
        "dx": rel(x_ep.grad, x_ref.grad),
        "dw": rel(w_ep.grad, w_ref.grad),
        "d_gate_up": rel(grads[0], ref_grads[0][mine]),
        "d_down": rel(grads[1], ref_grads[1][mine]),
    }


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["random", "empty_expert", "one_expert"])
@pytest.mark.timeout(120)
def test_ep_dispatch_equals_dense_loop(world, case):
    for rank, diffs in enumerate(run_distributed(_worker, world, case, timeout=90)):
        assert all(d < 1e-5 for d in diffs.values()), (rank, diffs)


@pytest.mark.timeout(180)
def test_ep_dispatch_with_sharded_weights_under_torch_compile():
    """Training's form: expert weights are DTensors on the ep mesh and the block is compiled (Dynamo traces the
    forward; the eager backend keeps the test fast)."""
    for rank, diffs in enumerate(run_distributed(_worker, 2, "random", True, timeout=150)):
        assert all(d < 1e-5 for d in diffs.values()), (rank, diffs)


def test_ep_without_group_equals_eager():
    from veomni_lightning.parallel.experts import register_experts_implementation

    register_experts_implementation()
    torch.manual_seed(0)
    experts = _experts(E)
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    x, index, weights = torch.randn(7, H), _routing("random", 0, 7), torch.rand(7, TOP_K)
    ours = experts(x, index, weights)
    experts.config._experts_implementation = "eager"
    torch.testing.assert_close(ours, experts(x, index, weights), rtol=1e-5, atol=1e-5)


def test_experts_layouts_the_ep_function_does_not_handle_are_refused():
    from types import SimpleNamespace

    from transformers.integrations.moe import use_experts_implementation

    from veomni_lightning.errors import ConfigError
    from veomni_lightning.models.adapters import TransformersAdapter

    @use_experts_implementation(is_transposed=True, has_bias=True)
    class TransposedExperts(torch.nn.Module):
        def __init__(self, config) -> None:
            super().__init__()
            self.num_experts = 4

    model = torch.nn.Sequential(TransposedExperts(SimpleNamespace(_experts_implementation=None)))
    with pytest.raises(ConfigError, match="biases, transposed weights; the 'ep' experts implementation"):
        TransformersAdapter().experts(model)
