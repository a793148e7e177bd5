"""--compile: torch.compile captures DETR with iRPE in one graph, with the rpe_ops custom ops in it (not
broken out, not decomposed), and the compiled training step equals the eager one."""
import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from detr_irpe import build_model
from detr_irpe.cli.flags import get_args_parser
from detr_irpe.attention import RPEMultiheadAttention
from detr_irpe.irpe import rpe_config_from_string

TINY = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
        '--enc_layers', '1', '--dec_layers', '1', '--dim_feedforward', '32', '--num_queries', '5', '--device', 'cpu',
        '--dropout', '0']


def recording(backend):
    """A torch.compile backend that notes the call targets of every graph it gets, then compiles with `backend`."""
    seen = set()

    def compile_graph(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == 'call_function')
        return lookup_backend(backend)(gm, example_inputs)
    return compile_graph, seen


def training_step(forward, model, criterion, images, targets):
    """Loss and gradients of `model`'s parameters, the forward pass run by `forward` (model or compiled model)."""
    model.zero_grad(set_to_none=True)
    losses = criterion(forward(images), targets)
    loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('dynamic', [None, True])
def test_compiled_detr_training_step_is_one_graph_with_the_op_and_equals_eager(dynamic):
    # aot_eager: dynamo's capture and AOTAutograd's joint graph, which are what can break on a custom op;
    # inductor's code generation (minutes for a whole DETR on 2 cores) is the slow test below. dynamic=True (as
    # gpu_check's CUDA-graph check compiles): symbolic sizes from the first call, and the iRPE ratio must stay a
    # constant (read as an attribute, torch makes it a graph input: 20 graph breaks on 2.14, an error on 2.11).
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, criterion, _ = build_model(get_args_parser().parse_args(TINY + ['--enc_rpe2d', 'rpe-2.0-product-ctx-1-qkv']))
    model.train()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)]  # the second one padded
    targets = [{'labels': torch.tensor([1, 2]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.2, 0.2]])},
               {'labels': torch.tensor([1]), 'boxes': torch.tensor([[0.4, 0.5, 0.3, 0.3]])}]
    eager_loss, eager_grads = training_step(model, model, criterion, images, targets)
    backend, seen = recording('aot_eager')
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)  # any graph break: an error
    loss, grads = training_step(compiled, model, criterion, images, targets)
    assert {'rpe_ops.rpe_index_qk.default', 'rpe_ops.rpe_reduce.default'} <= seen or \
        {'rpe_ops.rpe_index.default', 'rpe_ops.rpe_reduce.default'} <= seen, sorted(s for s in seen if 'rpe' in s)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_inductor_compiles_the_irpe_encoder_attention_whole_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = RPEMultiheadAttention(32, 2, rpe_config=rpe_config_from_string('rpe-2.0-product-ctx-1-qkv'))
    h, w = 6, 7
    x = torch.randn(h * w, 2, 32, requires_grad=True)
    mask = torch.zeros(2, h * w, dtype=torch.bool)
    mask[1, -5:] = True  # the second image padded
    weight = torch.linspace(-1, 1, x.numel()).view_as(x)

    def run(module):
        x.grad = None
        module.zero_grad(set_to_none=True)
        out = module(x, x, x, key_padding_mask=mask, height=h, width=w)[0]
        (out * weight).sum().backward()
        return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    expected = run(layer)
    backend, seen = recording('inductor')
    got = run(torch.compile(layer, backend=backend, fullgraph=True))
    assert any(s.startswith('rpe_ops.') for s in seen)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    for name, grad in got[2].items():
        torch.testing.assert_close(grad, expected[2][name], rtol=1e-4, atol=1e-5, msg=name)


def test_graphs_run_without_cuda_graphs_are_counted():
    """engine.cudagraph_skips reads inductor's own count: a CPU function under mode='reduce-overhead' is one such
    graph (train.py and gpu_check report the count, where inductor only logs the reason)."""
    from detr_irpe import engine
    torch._dynamo.reset()
    before = engine.cudagraph_skips()
    double = torch.compile(lambda x: x * 2 + 1, mode='reduce-overhead')
    assert torch.equal(double(torch.ones(3)), torch.full((3,), 3.0))
    assert engine.cudagraph_skips() == before + 1
