"""Task data: sequences of tasks stored as WebDataset shards, streamed per task.

Public API (other modules call exactly this)::

    seq = load_sequence(root, "mtil_order1", **data_options(cfg.data))   # Sequence(name, kind, tasks, held_out)
    train_tf, eval_tf = make_transforms(224, (0.9, 1.0))
    for images, labels in train_batches(seq.tasks[0], batch_size=64, rank=r, world_size=w, workers=8,
                                        seed=0, preprocess=train_tf, shuffle_buffer=1000):
        ...                                              # infinite
    stream = eval_batches(task, batch_size=256, rank=r, world_size=w, workers=8, preprocess=eval_tf)
    for images, labels, keys in stream: ...              # finite, each sample once over all ranks
    total = check_eval_count(stream)                     # all-reduced when torch.distributed is up
"""
from .decode import open_image
from .sequence import SEQUENCE_DIR, Sequence, data_options, load_sequence, resolve_sequence, shipped_sequences
from .shards import ShardLimits, expand_urls
from .stats import StreamStats
from .streams import EvalStream, TrainStream, check_eval_count, eval_batches, pretrain_batches, train_batches
from .task import TaskInfo, fill_template, read_task
from .transforms import make_transforms

__all__ = [
    "Sequence", "TaskInfo", "load_sequence", "read_task", "resolve_sequence", "shipped_sequences", "SEQUENCE_DIR",
    "train_batches", "eval_batches", "pretrain_batches", "check_eval_count", "TrainStream", "EvalStream",
    "StreamStats", "make_transforms", "open_image", "expand_urls", "fill_template", "data_options", "ShardLimits",
]
