"""COCO bbox evaluation: faster-coco-eval's C++ COCOeval where it is installed, pycocotools' COCOeval
(the reference implementation) otherwise or when asked; both give the same 12 stats and per-category AP.

Only the images passed to `update` are evaluated (all ground-truth images if `update` was never called).
Categories are the ground truth's; predicted labels are COCO category ids. The ground truth scored is the boxes
training uses (validate.evaluated_annotations): those it drops are left out, those it clips are clipped.
"""
import contextlib
import copy
import importlib.util
import io

import torch
from pycocotools.coco import COCO

from detr_irpe import UsageError, distributed
from detr_irpe.postprocess import coco_results

from .validate import evaluated_annotations

BACKENDS = ('faster_coco_eval', 'pycocotools')
MAX_DETECTIONS = 100  # COCOeval's largest maxDets: its AP counts an image's 100 highest-scored detections
STAT_NAMES = ('AP', 'AP50', 'AP75', 'AP_small', 'AP_medium', 'AP_large',
              'AR1', 'AR10', 'AR100', 'AR_small', 'AR_medium', 'AR_large')
# The 12 lines of COCOeval.summarize() for bbox: (AP or AR, IoU, area, max detections).
_TABLE = [(1, None, 'all', 100), (1, .5, 'all', 100), (1, .75, 'all', 100), (1, None, 'small', 100),
          (1, None, 'medium', 100), (1, None, 'large', 100), (0, None, 'all', 1), (0, None, 'all', 10),
          (0, None, 'all', 100), (0, None, 'small', 100), (0, None, 'medium', 100), (0, None, 'large', 100)]


def default_backend():
    """'faster_coco_eval' where the package is installed (about 7x faster on val2017), else 'pycocotools'."""
    return 'faster_coco_eval' if importlib.util.find_spec('faster_coco_eval') else 'pycocotools'


def resolve_backend(backend=None):
    """The backend to use: `backend` (one of BACKENDS) if it is installed, default_backend() for None.
    Tools call it at start-up, so a missing package stops a run before training, not after an epoch."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise UsageError(f'--eval_backend {backend!r} is not one of {", ".join(BACKENDS)}.')
    if importlib.util.find_spec(backend) is None:
        package = backend.replace('_', '-')
        raise UsageError(f'--eval_backend {backend}: the package {package} is not installed; install it '
                         f'(pip install {package}; `make setup` installs the pinned version) or pass '
                         f'--eval_backend {"pycocotools" if backend != "pycocotools" else "faster_coco_eval"}.')
    return backend


class CocoEvaluator:
    def __init__(self, coco_gt, backend=None):
        """coco_gt: a pycocotools COCO (the dataset's); backend: one of BACKENDS, None for default_backend()."""
        self.backend = resolve_backend(backend)
        self.dataset = coco_gt.dataset
        self.coco_gt = None  # made by summarize, when the pixel sizes of the images evaluated are known
        self.img_ids, self._seen, self.pixel_sizes = [], set(), {}
        self._results = []
        self.coco_eval = None

    def update(self, predictions, pixel_sizes=None):
        """predictions: {image_id: {'scores': (N,), 'labels': (N,), 'boxes': (N, 4) xyxy in original-image pixels}};
        pixel_sizes: {image_id: (height, width)} of the images as read (targets' 'orig_size'), to which the ground
        truth's boxes are clipped as training clips them (else to the entries' 'width' and 'height'). An image given
        again counts once (the loader gives the next image in place of an unreadable one: its detections twice would
        score as duplicates)."""
        for image_id, (height, width) in (pixel_sizes or {}).items():
            self.pixel_sizes[int(image_id)] = (int(width), int(height))
        for image_id, pred in predictions.items():
            if int(image_id) in self._seen:
                continue
            self._seen.add(int(image_id))
            self.img_ids.append(int(image_id))
            detections = {'scores': torch.as_tensor(pred['scores']).reshape(-1),
                          'labels': torch.as_tensor(pred['labels']).reshape(-1),
                          'boxes': torch.as_tensor(pred['boxes'], dtype=torch.float64).reshape(-1, 4)}
            self._results += coco_results(image_id, detections, rounded=False)

    def synchronize_between_processes(self):
        """Gather the predictions of all processes to the main process, which alone runs COCOeval (no-op
        without torch.distributed). The other processes are left with none."""
        gathered = distributed.gather_to_main((self.img_ids, self._results, self.pixel_sizes)) or []
        # The sampler pads the images to a multiple of the process count (as DistributedSampler), so a few
        # were evaluated twice: their detections count once, from the first process that has them.
        seen, self.img_ids, self._results, self.pixel_sizes = set(), [], [], {}
        for ids, results, sizes in gathered:
            new = set(ids) - seen
            self.img_ids += [i for i in ids if i in new]
            self._results += [r for r in results if r['image_id'] in new]
            self.pixel_sizes.update(sizes)
            seen |= new

    def results(self):
        """COCO result dicts (image_id, category_id, bbox xywh, score), ready for a results JSON."""
        return list(self._results)

    def summarize(self):
        """Run COCOeval, print the 12-line COCO table and per-category AP.
        Returns {'bbox': [12 floats, -1 where undefined], 'per_category_ap': {category name: AP or -1}}."""
        self.coco_gt = COCO()
        self.coco_gt.dataset = {**copy.deepcopy({k: v for k, v in self.dataset.items() if k != 'annotations'}),
                                'annotations': evaluated_annotations(self.dataset, self.pixel_sizes)}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco_gt.createIndex()
        img_ids = sorted(set(self.img_ids)) or sorted(self.coco_gt.getImgIds())
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = (self._faster_coco_eval if self.backend == 'faster_coco_eval' else self._pycocotools)(img_ids)
        self.coco_eval = coco_eval
        stats = [float(s) for s in coco_eval.stats[:12]]
        for (ap, iou, area, max_dets), value in zip(_TABLE, stats):
            title, kind = ('Average Precision', '(AP)') if ap else ('Average Recall', '(AR)')
            iou_text = '0.50:0.95' if iou is None else f'{iou:0.2f}'
            print(f' {title:<18} {kind} @[ IoU={iou_text:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = '
                  f'{value:0.3f}')

        # precision: (iou thresholds, recall thresholds, categories, area ranges, max dets); -1 = no ground truth
        precision = coco_eval.eval['precision']
        per_category_ap = {}
        for k, cat_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            per_category_ap[self.coco_gt.cats[cat_id]['name']] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        width = max([len(n) for n in per_category_ap] + [8])
        print(f'{"category":<{width}}  AP@[.5:.95]')
        for name, ap in per_category_ap.items():  # -1 (COCO's undefined) stays in the returned stats
            print(f'{name:<{width}}  ' + (f'{ap:.3f}' if ap > -1 else '-      (no annotation in the images evaluated)'))
        return {'bbox': stats, 'per_category_ap': per_category_ap}

    def _pycocotools(self, img_ids):
        from pycocotools.cocoeval import COCOeval
        if self._results:
            coco_dt = self.coco_gt.loadRes(_fresh(self._results))
        else:  # pycocotools' loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {'images': self.coco_gt.dataset['images'], 'annotations': [],
                               'categories': copy.deepcopy(self.coco_gt.dataset.get('categories', []))}
            coco_dt.createIndex()
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType='bbox')
        coco_eval.params.imgIds = img_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        return coco_eval

    def _faster_coco_eval(self, img_ids):
        from faster_coco_eval import COCO, COCOeval_faster
        quiet = dict(print_function=lambda *args, **kwargs: None)
        dataset = self.coco_gt.dataset
        coco_gt = COCO({**dataset, 'annotations': _fresh(dataset.get('annotations', []))}, **quiet)
        coco_dt = coco_gt.loadRes(_fresh(self._results))
        coco_eval = COCOeval_faster(coco_gt, coco_dt, iouType='bbox', **quiet)
        coco_eval.params.imgIds = img_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        return coco_eval


def _fresh(entries):
    """Copies of annotation or result dicts for COCO objects and COCOeval, which add keys to them in place
    (id, area, ignore, ...); one level is enough, they replace values and never modify them (a deepcopy of
    500 k detections took longer than the evaluation)."""
    return [dict(e) for e in entries]
