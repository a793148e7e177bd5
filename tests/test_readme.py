"""The README's Python section runs as printed, and says what its comments say it gives."""
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_python_blocks():
    with open(os.path.join(ROOT, 'README.md')) as f:
        return re.findall(r'```python\n(.*?)```', f.read(), re.S)


@pytest.mark.slow  # the flex block compiles
def test_the_readme_python_blocks_run_in_order_and_give_what_their_comments_say(capsys):
    model_block, irpe_block, flex_block = readme_python_blocks()
    names = {}
    exec(compile(model_block, 'README.md (model)', 'exec'), names)
    outputs, results = names['outputs'], names['results']
    assert outputs['pred_logits'].shape == (2, 100, 92) and outputs['pred_boxes'].shape == (2, 100, 4)
    assert 0 <= outputs['pred_boxes'].min() and outputs['pred_boxes'].max() <= 1
    boxes = results[1]['boxes']  # xyxy in the 512 x 512 image's pixels
    assert (boxes[:, 2:] >= boxes[:, :2]).all() and 0 <= boxes.min() and boxes.max() <= 512
    assert 'torch.Size([100])' in capsys.readouterr().out

    exec(compile(irpe_block, 'README.md (irpe)', 'exec'), names)
    B, H, L, d = 2, 6, 1 + 14 * 14, 64
    assert names['attn'].shape == (B, H, L, L) and names['out'].shape == (B, H, L, d)
    assert names['rpe_q'] is None and names['rpe_v'] is None
    q, k, v = names['q'], names['k'], names['v']
    without_irpe = (q @ k.transpose(-2, -1)).softmax(-1) @ v
    assert (names['out'] - without_irpe).abs().max() > 1e-2  # the tables matter, so "equals out" below tests them
    assert [p.data_ptr() for p in names['tables']] == [p.data_ptr() for p in names['rpe_k'].parameters()]

    if torch.backends.cpu.get_cpu_capability() != 'AVX512':  # the README says flex is refused there
        with pytest.raises(NotImplementedError, match='needs AVX-512'):
            exec(compile(flex_block, 'README.md (flex)', 'exec'), names)
        return
    exec(compile(flex_block, 'README.md (flex)', 'exec'), names)
    torch.testing.assert_close(names['fused'], names['out'].detach(), rtol=1e-4, atol=1e-5)  # "equals out"
