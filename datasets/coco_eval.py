"""COCO bbox evaluation with pycocotools' COCOeval.

Only the images passed to `update` are evaluated (all ground-truth images if `update` was never called).
Categories are the ground truth's; predicted labels are COCO category ids.
"""
import contextlib
import copy
import io

import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_irpe.postprocess import coco_results

STAT_NAMES = ('AP', 'AP50', 'AP75', 'AP_small', 'AP_medium', 'AP_large',
              'AR1', 'AR10', 'AR100', 'AR_small', 'AR_medium', 'AR_large')


class CocoEvaluator:
    def __init__(self, coco_gt):
        self.coco_gt = copy.deepcopy(coco_gt)
        self.img_ids = []
        self._results = []
        self.coco_eval = None

    def update(self, predictions):
        """predictions: {image_id: {'scores': (N,), 'labels': (N,), 'boxes': (N, 4) xyxy in original-image pixels}}"""
        for image_id, pred in predictions.items():
            self.img_ids.append(int(image_id))
            detections = {'scores': torch.as_tensor(pred['scores']).reshape(-1),
                          'labels': torch.as_tensor(pred['labels']).reshape(-1),
                          'boxes': torch.as_tensor(pred['boxes'], dtype=torch.float64).reshape(-1, 4)}
            self._results += coco_results(image_id, detections, rounded=False)

    def synchronize_between_processes(self):
        """Gather the predictions of all ranks (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.img_ids, self._results))
        self.img_ids = [i for ids, _ in gathered for i in ids]
        self._results = [r for _, results in gathered for r in results]

    def results(self):
        """COCO result dicts (image_id, category_id, bbox xywh, score), ready for a results JSON."""
        return list(self._results)

    def summarize(self):
        """Run COCOeval, print the 12-line COCO table and per-category AP.
        Returns {'bbox': [12 floats, -1 where undefined], 'per_category_ap': {category name: AP or -1}}."""
        if self._results:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = self.coco_gt.loadRes(copy.deepcopy(self._results))  # loadRes adds keys in place
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {'images': self.coco_gt.dataset['images'], 'annotations': [],
                               'categories': copy.deepcopy(self.coco_gt.dataset.get('categories', []))}
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt.createIndex()
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType='bbox')
        coco_eval.params.imgIds = sorted(set(self.img_ids)) or sorted(self.coco_gt.getImgIds())
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        coco_eval.summarize()
        self.coco_eval = coco_eval

        # precision: (iou thresholds, recall thresholds, categories, area ranges, max dets); -1 = no ground truth
        precision = coco_eval.eval['precision']
        per_category_ap = {}
        for k, cat_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            per_category_ap[self.coco_gt.cats[cat_id]['name']] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        width = max([len(n) for n in per_category_ap] + [8])
        print(f'{"category":<{width}}  AP@[.5:.95]')
        for name, ap in per_category_ap.items():
            print(f'{name:<{width}}  {ap:.3f}')
        return {'bbox': [float(s) for s in coco_eval.stats], 'per_category_ap': per_category_ap}
