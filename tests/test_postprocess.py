"""From normalised predictions to detections in pixels of the original image."""
import math

import pytest
import torch

from detr_irpe.postprocess import PostProcess


def test_scores_labels_and_pixel_boxes():
    # 2 real classes + no-object; the second query is most likely empty but still reports class 1
    logits = torch.tensor([[[3.0, 1.0, 0.0],
                            [0.0, 1.0, 4.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4],
                           [0.25, 0.75, 0.5, 0.5]]])
    (result,) = PostProcess()({'pred_logits': logits, 'pred_boxes': boxes}, torch.tensor([[480, 640]]))

    def prob(row, k):
        return math.exp(row[k]) / sum(math.exp(v) for v in row)

    assert result['labels'].tolist() == [0, 1]
    assert result['scores'].tolist() == pytest.approx([prob([3, 1, 0], 0), prob([0, 1, 4], 1)], abs=1e-6)
    # image is 640 wide, 480 high: x scales by 640, y by 480
    torch.testing.assert_close(result['boxes'], torch.tensor([[256.0, 144.0, 384.0, 336.0],
                                                              [0.0, 240.0, 320.0, 480.0]]))


def test_each_image_uses_its_own_size():
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0]]).expand(2, 1, 4)
    results = PostProcess()({'pred_logits': torch.zeros(2, 1, 4), 'pred_boxes': boxes},
                            torch.tensor([[100, 200], [300, 50]]))
    assert [r['boxes'].tolist() for r in results] == [[[0, 0, 200, 100]], [[0, 0, 50, 300]]]
    assert all(r['scores'].tolist() == pytest.approx([0.25]) for r in results)


def test_target_sizes_as_pairs_equal_the_tensor_and_a_wrong_shape_is_refused():
    outputs = {'pred_logits': torch.zeros(2, 1, 4), 'pred_boxes': torch.tensor([[0.5, 0.5, 1.0, 1.0]]).expand(2, 1, 4)}
    tensor = PostProcess()(outputs, torch.tensor([[100, 200], [300, 50]]))
    # as transformers' post-processing takes them, and as a loader's targets give them ('orig_size' per image)
    for sizes in ([(100, 200), (300, 50)], [torch.tensor([100, 200]), torch.tensor([300, 50])]):
        assert all(torch.equal(a['boxes'], b['boxes']) for a, b in zip(PostProcess()(outputs, sizes), tensor))
    for sizes in (torch.tensor([100, 200]), [(100, 200)], torch.zeros(2, 3)):
        with pytest.raises(ValueError, match=r'target_sizes has shape .* for 2 images.*expected \(B, 2\)'):
            PostProcess()(outputs, sizes)


def test_category_ids_keep_their_classes_and_refuse_ids_the_model_lacks():
    logits = torch.tensor([[[3.0, 1.0, 2.0, 0.0]]])  # 3 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    (result,) = PostProcess([1, 2])({'pred_logits': logits, 'pred_boxes': boxes}, torch.tensor([[10, 10]]))
    assert result['labels'].tolist() == [2]  # class 0 out of the running
    # an id past the classes was dropped silently (all ids past them: every score 0, label 0)
    with pytest.raises(ValueError, match=r'category ids \[3, 5\] outside the 3 classes'):
        PostProcess([1, 3, 5])({'pred_logits': logits, 'pred_boxes': boxes}, torch.tensor([[10, 10]]))
