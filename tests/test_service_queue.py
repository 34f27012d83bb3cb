"""The queue's cost does not grow with its length: a job's start touches no waiting job, and positions
are derived when asked. Checked on the service itself with a stand-in model that runs when released."""

import threading

from pixart_sigma.server.service import Service
from pixart_sigma.server.store import JobStore


class Released:
    """A stand-in model: the service's checks pass through; each generation waits for one release."""

    settings = {"width": 64, "height": 64}

    def __init__(self):
        self.releases = threading.Semaphore(0)
        self.started = threading.Semaphore(0)

    def validate_call(self, prompt, **values):
        return prompt, {"seed": 1, "num_images_per_prompt": 1, "num_inference_steps": 1, "compile": False, **values}

    def generate(self, prompt, on_progress=None, cancel=None, **settings):
        self.started.release()
        assert self.releases.acquire(timeout=30)
        return []


def test_starting_jobs_adds_no_event_to_the_waiting_ones_and_positions_follow(tmp_path):
    model = Released()
    service = Service({"stand-in": model}, JobStore(tmp_path), queue_size=3000)
    service.start()
    try:
        ids = [service.submit({"prompt": f"job {k}"})[0].id for k in range(3000)]
        assert model.started.acquire(timeout=30)  # the first is running
        assert service.queue_position(ids[-1]) == 3000 - 1
        model.releases.release()
        for _ in range(19):
            assert model.started.acquire(timeout=30)
            model.releases.release()
        assert model.started.acquire(timeout=30)  # the 21st is running now
        waiting = ids[21:]
        assert sum(len(service.progress(job_id).events) for job_id in waiting) == 0  # was 20 events each
        assert service.queue_position(waiting[0]) == 1 and service.queue_position(ids[-1]) == len(waiting)
        service.cancel(waiting[0])
        assert service.queue_position(waiting[1]) == 1 and service.queue_position(waiting[0]) is None
    finally:
        service.drain()
        model.releases.release()
        assert service.wait_stopped(timeout=30)
        service.store.close()
