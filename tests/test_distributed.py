"""Collectives run on the process's device: CUDA under nccl (which refuses CPU tensors), CPU under gloo.

No GPU is needed: two processes run the training path (train_one_epoch, evaluate with the COCO evaluator)
over a real gloo group whose public collectives check every tensor they receive against the device NCCL
would demand. In the 'nccl' case the group poses as nccl: init_process_group('nccl') makes a gloo group,
get_backend() says 'nccl', torch.cuda.set_device/current_device are recorded, and tensors made for
device 'cuda:N' are CPU tensors that report device cuda:N (FakeCuda). A CPU tensor handed to a collective
there fails the test, as NCCL fails a real run.
"""
import contextlib
import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

TINY = ['--backbone', 'resnet18', '--backbone_weights', 'none', '--hidden_dim', '32', '--nheads', '2',
        '--enc_layers', '1', '--dec_layers', '1', '--dim_feedforward', '32', '--num_queries', '5',
        '--enc_rpe2d', 'rpe-2.0-product-ctx-1-k', '--dropout', '0', '--num_classes', '4']
TENSOR_COLLECTIVES = ('all_reduce', 'all_gather', 'all_gather_into_tensor', 'gather', 'broadcast', 'reduce',
                      'reduce_scatter', 'reduce_scatter_tensor', 'scatter', 'all_to_all', 'all_to_all_single')
OBJECT_COLLECTIVES = ('all_gather_object', 'gather_object', 'broadcast_object_list', 'scatter_object_list')


class FakeCuda(torch.Tensor):
    """A CPU tensor that reports device cuda:N: what a tensor on this process's GPU looks like to a collective."""

    @staticmethod
    def __new__(cls, inner, index):
        t = torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, strides=inner.stride(),
                                                device=torch.device('cuda', index))
        t.inner = inner
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        index = next(x.device.index for x in tree_leaves([args, kwargs]) if isinstance(x, FakeCuda))
        kwargs = dict(kwargs or {})
        to_cpu = 'device' in kwargs and torch.device(kwargs['device']).type == 'cpu'
        kwargs.pop('device', None)
        out = func(*tree_map(lambda x: x.inner if isinstance(x, FakeCuda) else x, args), **kwargs)
        return out if to_cpu else tree_map(lambda x: FakeCuda(x, index) if isinstance(x, torch.Tensor) else x, out)


class FakeCudaFactories(TorchFunctionMode):
    """Tensors asked for on a CUDA device are made on the CPU and wrapped in FakeCuda."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get('device')
        if device is not None and torch.device(device).type == 'cuda':
            kwargs['device'] = 'cpu'
            return FakeCuda(func(*args, **kwargs), torch.device(device).index or 0)
        if func is torch.Tensor.tolist and isinstance(args[0], FakeCuda):
            return args[0].inner.tolist()
        return func(*args, **kwargs)


class CollectiveChecker:
    """Wraps torch.distributed's public collectives: each tensor must be on `expected_device()`; object
    collectives under nccl need the current CUDA device set to LOCAL_RANK first (torch pickles into tensors
    there). Records what each process sent and which collectives ran."""

    def __init__(self, monkeypatch, pose_as_nccl):
        self.calls, self.sent, self.cuda_device = [], {}, None
        self.pose_as_nccl = pose_as_nccl
        for name in TENSOR_COLLECTIVES:
            monkeypatch.setattr(dist, name, self._tensor_collective(name, getattr(dist, name)))
        for name in OBJECT_COLLECTIVES:
            monkeypatch.setattr(dist, name, self._object_collective(name, getattr(dist, name)))
        if pose_as_nccl:
            init = dist.init_process_group
            monkeypatch.setattr(dist, 'init_process_group', lambda backend, **kw: init('gloo', **kw))
            monkeypatch.setattr(dist, 'get_backend', lambda group=None: 'nccl')
            monkeypatch.setattr(torch.cuda, 'set_device', lambda device: setattr(self, 'cuda_device', int(device)))
            monkeypatch.setattr(torch.cuda, 'current_device', lambda: self.cuda_device)
            barrier = dist.barrier
            monkeypatch.setattr(dist, 'barrier', self._nccl_barrier(barrier))

    def _nccl_barrier(self, real):
        def checked(group=None, async_op=False, device_ids=None):
            # without device_ids nccl guesses the GPU (rank modulo the GPUs it sees), not this process's
            assert device_ids == [int(os.environ['LOCAL_RANK'])], f'dist.barrier under nccl, device_ids={device_ids}'
            self.calls.append('barrier')
            return real(group=group, async_op=async_op)
        return checked

    def expected_device(self):
        return torch.device('cuda', int(os.environ['LOCAL_RANK'])) if self.pose_as_nccl else torch.device('cpu')

    def _tensor_collective(self, name, real):
        def checked(*args, **kwargs):
            from detr_irpe.distributed import host_group
            tensors = [x for x in tree_leaves([args, kwargs]) if isinstance(x, torch.Tensor)]
            assert tensors, f'dist.{name} called without a tensor'
            on_host = kwargs.get('group') is not None and kwargs.get('group') is host_group()  # gloo under nccl too
            expected = torch.device('cpu') if on_host else self.expected_device()
            for t in tensors:
                assert t.device == expected, (
                    f'dist.{name} got a tensor on {t.device}; the {"nccl" if self.pose_as_nccl else "gloo"} '
                    f'process group needs {expected}')
            self.calls.append(f'{name} on the host group' if on_host else name)
            if name == 'all_reduce':
                self.sent.setdefault(name, []).append(_cpu(args[0]).clone())
            return real(*tree_map(lambda x: x.inner if isinstance(x, FakeCuda) else x, args), **kwargs)
        return checked

    def _object_collective(self, name, real):
        def checked(*args, **kwargs):
            if self.pose_as_nccl:
                assert self.cuda_device == int(os.environ['LOCAL_RANK']), (
                    f'dist.{name} under nccl before torch.cuda.set_device(LOCAL_RANK)')
            self.calls.append(name)
            self.sent.setdefault(name, []).append(args[0] if name != 'all_gather_object' else args[1])
            return real(*args, **kwargs)
        return checked


def _cpu(t):
    return t.inner if isinstance(t, FakeCuda) else t


def _ground_truth():
    images = [{'id': i, 'height': 64, 'width': 64, 'file_name': f'{i}.jpg'} for i in range(1, 5)]
    annotations = [{'id': i, 'image_id': i, 'category_id': 1 + i % 3, 'bbox': [8.0, 10.0, 30.0 + i, 24.0],
                    'area': (30.0 + i) * 24.0, 'iscrowd': 0} for i in range(1, 5)]
    coco = COCO()
    coco.dataset = {'images': images, 'annotations': annotations,
                    'categories': [{'id': c, 'name': f'class{c}'} for c in (1, 2, 3)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _batch(image_ids, seed):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 64, 64, generator=g) for _ in image_ids]
    targets = [{'labels': torch.tensor([1 + i % 3]), 'boxes': torch.tensor([[0.4, 0.35, 0.5, 0.375]]),
                'image_id': torch.tensor(i), 'orig_size': torch.tensor([64, 64])} for i in image_ids]
    return images, targets


def _run(rank, tmp, pose_as_nccl):
    import detr_irpe_datasets.build as datasets
    from detr_irpe import build_model, distributed, engine
    from detr_irpe.cli.flags import get_args_parser
    from detr_irpe.precision import choose_precision

    with pytest.MonkeyPatch.context() as monkeypatch:
        checker = CollectiveChecker(monkeypatch, pose_as_nccl)
        args = get_args_parser().parse_args(TINY + ['--dist_url', f'file://{tmp}/rendezvous'])
        args.device = 'cuda' if pose_as_nccl else 'cpu'  # set after parsing, which refuses cuda without a GPU
        distributed.init_distributed(args)
        assert args.distributed and args.device == ('cuda:%d' % rank if pose_as_nccl else 'cpu')
        torch.manual_seed(0)
        args.device = 'cpu'  # the arithmetic runs on the CPU; the collectives see the device of an nccl run
        model, criterion, postprocessors = build_model(args)
        optimizer = engine.build_optimizer(model, args)
        scheduler = engine.build_lr_scheduler(optimizer, args)
        mine = [rank + 1, rank + 3]  # rank 0 has images 1 and 3, rank 1 images 2 and 4
        with FakeCudaFactories() if pose_as_nccl else contextlib.nullcontext():
            averages = engine.train_one_epoch(model, criterion, [_batch(mine, rank)] * 2, optimizer, scheduler,
                                              'cpu', 0, args, choose_precision('cpu', amp=False))
            evaluator = datasets.CocoEvaluator(_ground_truth(), backend='pycocotools')
            with contextlib.redirect_stdout(io.StringIO()):
                summary = engine.evaluate(model, postprocessors, [_batch(mine, 10 + rank)], evaluator, 'cpu')
            # SIGTERM on one process stops all of them at the same step
            stop = (distributed.any_process(rank == 1), distributed.any_process(False))
        dist.destroy_process_group()
    return {'averages': averages, 'calls': checker.calls, 'sent': checker.sent, 'summary': summary,
            'held': (evaluator.img_ids, evaluator.results(), evaluator.pixel_sizes), 'stop': stop}


def _worker(rank, tmp):
    """Both cases in one pair of processes (one start-up): a gloo group, then one posing as nccl."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.set_num_threads(1)
    results = {mode: _run(rank, os.path.join(tmp, mode), mode == 'nccl') for mode in ('gloo', 'nccl')}
    torch.save(results, os.path.join(tmp, f'rank{rank}.pt'))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """{'gloo': [rank 0's record, rank 1's], 'nccl': [...]}."""
    tmp = str(tmp_path_factory.mktemp('two_processes'))
    for mode in ('gloo', 'nccl'):
        os.makedirs(os.path.join(tmp, mode))
    mp.spawn(_worker, args=(tmp,), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(tmp, f'rank{r}.pt'), weights_only=False) for r in range(2)]
    return {mode: [rank[mode] for rank in ranks] for mode in ('gloo', 'nccl')}


@pytest.fixture(params=['gloo', 'nccl'])
def two_process_run(request, runs):
    return runs[request.param]


@pytest.mark.slow
def test_training_and_evaluation_collectives_run_on_the_process_device(two_process_run):
    # The checks ran inside the workers (a wrong device fails the spawn); here: they did run.
    for rank in two_process_run:
        assert 'all_reduce' in rank['calls'] and 'gather_object' in rank['calls']


@pytest.mark.slow
def test_logged_losses_are_the_mean_over_processes(two_process_run):
    keys = sorted(two_process_run[0]['averages'])
    # the logged losses' all-reduce (the others carry one number: box counts, stop requests)
    sent = [[t for t in rank['sent']['all_reduce'] if t.numel() == len(keys)][-1].double() for rank in two_process_run]
    mean = (sent[0] + sent[1]) / 2
    for rank in two_process_run:
        assert [rank['averages'][k] for k in keys] == pytest.approx(mean.tolist(), rel=1e-12)
    assert sent[0].tolist() != sent[1].tolist()  # the processes saw different images


@pytest.mark.slow
def test_detections_are_gathered_to_the_main_process_only(two_process_run):
    main, other = two_process_run
    assert 'all_gather_object' not in main['calls'] + other['calls']
    ids, results, sizes = zip(*(rank['sent']['gather_object'][0] for rank in two_process_run))
    assert main['held'] == ([i for part in ids for i in part], [r for part in results for r in part],
                            {**sizes[0], **sizes[1]})
    assert sorted(main['held'][0]) == [1, 2, 3, 4] and len(main['held'][1]) == 4 * 5  # 5 queries per image
    assert sorted(main['held'][2]) == [1, 2, 3, 4]  # the pixel sizes the ground truth is clipped to
    assert other['held'] == ([], [], {}) and other['summary'] is None
    assert len(main['summary']['bbox']) == 12


@pytest.mark.slow
def test_a_stop_request_on_one_process_reaches_all(two_process_run):
    assert [rank['stop'] for rank in two_process_run] == [(True, False), (True, False)]


@pytest.mark.slow
def test_under_nccl_stop_requests_go_over_the_host_group_and_box_counts_stay_on_the_gpu(runs):
    # Reading a CUDA tensor after each step would wait for the GPU's queue: the stop request is a CPU tensor on a
    # gloo group of its own; the box count is reduced on the GPU (the checker saw its device) and never read back.
    for rank in runs['nccl']:
        assert rank['calls'].count('all_reduce on the host group') >= 2  # the two stop requests
        assert 'all_reduce' in rank['calls']
        assert 'barrier' in rank['calls']
    for rank in runs['gloo']:
        assert not any('host group' in call for call in rank['calls'])
