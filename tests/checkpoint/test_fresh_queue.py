"""A run started from a checkpoint begins with a fresh ITC queue (its embeddings and the inputs ITM
draws negatives from), as the original's fine-tuning load (coarse spec §5.1: queue buffers dropped,
``temp`` kept); ``--resume`` restores the queue."""

import torch

from fiber_d2.checkpoint.checkpointer import FIBERCheckpointer
from fiber_d2.modeling.meta_arch.coarse_losses import FeatureQueue


class _Coarse(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.temp = torch.nn.Parameter(torch.tensor(0.07))
        self.proj = torch.nn.Linear(4, 4)
        self.queue = FeatureQueue(4, 8)
        self.queue.hold_inputs(image_size=2, text_length=5, pad_token_id=1)


def _saved(tmp_path):
    torch.manual_seed(0)
    source = _Coarse()
    with torch.no_grad():
        source.temp.fill_(0.05)
        inputs = (
            torch.full((3, 3, 2, 2), 7, dtype=torch.uint8),
            torch.full((3, 4), 9),
            torch.ones(3, 4),
        )
        source.queue.enqueue(torch.ones(3, 4), torch.ones(3, 4), inputs)  # ptr 3, total 3
    path = str(tmp_path / "coarse.pth")
    torch.save({"model": source.state_dict()}, path)
    return source, path


def test_a_new_run_keeps_its_own_queue_and_loads_the_rest(tmp_path):
    source, path = _saved(tmp_path)
    torch.manual_seed(1)
    model = _Coarse()
    fresh = {k: v.clone() for k, v in model.queue.state_dict().items()}
    FIBERCheckpointer(model, str(tmp_path / "run")).resume_or_load(path, resume=True)
    assert torch.equal(model.temp, source.temp)  # carried over
    assert torch.equal(model.proj.weight, source.proj.weight)
    for k, v in model.queue.state_dict().items():
        assert torch.equal(v, fresh[k]), k
    assert int(model.queue.queue_ptr) == 0 and not torch.equal(
        model.queue.image_queue, source.queue.image_queue
    )
    assert model.queue.image_input_queue.sum() == 0 and model.queue.text_input_mask_queue.sum() == 0


def test_resume_restores_the_queue(tmp_path):
    source, _ = _saved(tmp_path)
    FIBERCheckpointer(source, str(tmp_path)).save("model_0000009")
    model = _Coarse()
    FIBERCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    for k, v in model.queue.state_dict().items():
        assert torch.equal(v, source.queue.state_dict()[k]), k
    # a plain load (evaluation, the predictor) reads every tensor of the file
    other = _Coarse()
    FIBERCheckpointer(other).load(str(tmp_path / "model_0000009.pth"))
    assert int(other.queue.queue_total) == 3
    assert other.queue.image_input_queue[:3].eq(7).all() and other.queue.text_input_queue[0, 3] == 9
