"""Distributed training glue: `torchrun --nproc_per_node N tools/train.py ...` runs DistributedDataParallel
(gloo on CPU, nccl on GPU); several machines through torchrun's own flags."""
import atexit
import datetime
import os

import torch
import torch.distributed as dist

from detr_irpe import UsageError

_host_group = None  # see host_group()


def init_distributed(args):
    """Set args.distributed, args.rank, args.world_size, args.gpu from torchrun's environment."""
    global _host_group
    if 'RANK' not in os.environ or int(os.environ.get('WORLD_SIZE', 1)) <= 1:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, None
        return
    args.rank, args.world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    cuda = torch.device(args.device).type == 'cuda'
    if cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    try:
        # The timeout bounds the rendezvous and every collective: a group missing a process fails, never hangs.
        dist.init_process_group('nccl' if cuda else 'gloo', init_method=args.dist_url,
                                world_size=args.world_size, rank=args.rank, timeout=timeout)
        args.distributed = True
        _host_group = dist.new_group(backend='gloo', timeout=timeout) if cuda else None
        # Torn down before the interpreter's exit: gloo's threads left to static destruction abort the process
        # now and then ("terminate called without an active exception"), failing a run that had finished.
        atexit.register(_destroy_process_group)
        barrier()
    except dist.DistError as e:
        raise UsageError(f'process {args.rank} of {args.world_size}: not every process arrived within '
                         f'--dist_timeout {args.dist_timeout} s ({str(e).splitlines()[0]}); a process died or never '
                         'started: see its log, or raise --dist_timeout. Across machines, set GLOO_SOCKET_IFNAME (and '
                         'NCCL_SOCKET_IFNAME) to the network interface they reach each other on.') from None
    if (args.rank == 0 and int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) > 0
            and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'):
        print('warning: torchrun --max-restarts with its shared rendezvous store: a restarted group can read the '
              "previous group's addresses and fail to connect (pytorch/pytorch#135712); launch torchrun with "
              'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment.', flush=True)


def _destroy_process_group():
    global _host_group
    _host_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed():
    """Whether this process is one of a process group (init_distributed ran with several processes)."""
    return dist.is_available() and dist.is_initialized()


def is_main_process():
    return get_rank() == 0


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def process_device():
    """The device the tensors of a collective must be on: this process's CUDA device under nccl (which
    takes nothing else; init_distributed made it the current device), the CPU under gloo."""
    if is_distributed() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def host_group():
    """The process group for flags the host acts on: gloo, over CPU tensors (under nccl a group of its own; None, the
    default group, under gloo), so that asking never waits for the GPU to finish its queue."""
    return _host_group


def all_reduce_mean(values):
    """Average a dict of floats over processes (for logging). The same keys on every process."""
    if not is_distributed():
        return values
    keys = sorted(values)
    t = all_reduce_mean_(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=process_device()))
    return dict(zip(keys, t.tolist()))


def all_reduce_mean_(tensor):
    """Average tensor over processes, in place on its device (process_device()); nothing is read back to the host."""
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= get_world_size()
    return tensor


def gather_to_main(obj):
    """[obj of process 0, obj of process 1, ...] on the main process, None on the others: what only the
    main process uses (detections for COCOeval) is sent there alone, not to every process. Pickled into
    tensors on process_device() by torch (its current CUDA device under nccl)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def any_process(flag):
    """True on every process if `flag` is true on any: a max all-reduce over host_group() (the stop request after
    every training step reads no GPU tensor)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return t.item() > 0


def barrier():
    if is_distributed():
        # nccl's on this process's GPU: without device_ids it guesses one (rank modulo the GPUs seen, by torch version)
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == 'nccl' else None)
