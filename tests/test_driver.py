"""alto cluster's driver (alto.cluster.Driver) on a backend of the test's own: the lifecycle of
submissions (placed, started, dead and restarted from a checkpoint, failed alone, cancelled at a
checkpoint, done), its events and status, with no Ray and no training (alto.backend is the seam;
tests/test_cluster.py runs the same driver on a local Ray)."""
import csv
import json
from pathlib import Path

import pytest

from conftest import TINY_LLAMA, write_word_records

from alto import task_queue
from alto.backend import Poll, RankArgs, RanksDied, RunFailed
from alto.checkpoint import CHECKPOINT
from alto.cli import main
from alto.cluster import Driver
from alto.tune import HALTED


class ScriptedBackend:
    """Runs nothing: each launch of a submission plays the next entry of its script once its ranks
    have started (one poll later): "done" (exit 0, 3 polls later; "done slowly": 12), "died" (a process died,
    after writing a checkpoint), "error" (its run raised), "until halted" (runs until asked to
    halt). Ranks that ended must be released before anything else is polled."""

    def __init__(self, slots: int, scripts: dict[str, list[str]]):
        self.slots, self.scripts = slots, {name: list(script) for name, script in scripts.items()}
        self.launches: list[tuple[str, int, bool]] = []
        self.held: list[dict] = []  # launched, not yet released
        self.most_held = 0
        self.released = 0
        self.closed = False

    def connect(self) -> tuple[int, int]:
        return self.slots, 1

    def launch(self, name: str, world: int, args: RankArgs) -> dict:
        self.launches.append((name, world, args.resume))
        launched = {"name": name, "args": args, "polls": 0, "play": self.scripts[name].pop(0), "halted": False}
        self.held.append(launched)
        self.most_held = max(self.most_held, len(self.held))
        return launched

    def poll(self, launched: dict) -> Poll:
        assert not [h["name"] for h in self.held if h.get("ended")], "ranks that ended were not released"
        launched["polls"] += 1
        if launched["polls"] == 1:
            return Poll(pids=[1000 + len(self.launches)])
        play = launched["play"]
        launched["ended"] = play in ("died", "error")
        if play == "died":
            (Path(launched["args"].run_dir) / CHECKPOINT).write_bytes(b"")  # it got as far as a checkpoint
            raise RanksDied("ActorDiedError")
        if play == "error":
            raise RunFailed("ValueError: data.path: no such file")
        if (play == "until halted" and not launched["halted"]) or (play.startswith("done") and launched["polls"] < (13 if play == "done slowly" else 4)):
            return Poll(progress={"micro_steps": launched["polls"], "from_micro_step": 0, "running": 1, "queued": 0,
                                  "seconds": 0.1})
        launched["ended"] = True
        return Poll(codes=[HALTED if play == "until halted" else 0])

    def halt(self, launched: dict) -> None:
        launched["halted"] = True

    def release(self, launched: dict) -> None:
        self.held.remove(launched)
        self.released += 1

    def close(self) -> None:
        self.closed = True


def submit(tmp_path: Path, queue: Path, name: str) -> None:
    data = write_word_records(tmp_path / "data.jsonl", max_words=6)
    doc = {"name": name, "model": {"random_llama": TINY_LLAMA}, "device": "cpu",
           "data": {"source": "jsonl", "path": str(data), "max_length": 24},
           "adapters": [{"id": "a", "rank": 2, "max_steps": 4}]}
    (tmp_path / f"{name}.yaml").write_text(json.dumps(doc))
    task_queue.submit(queue, str(tmp_path / f"{name}.yaml"), 1)


def events(queue: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with open(queue / "events.csv") as f:
        for e in csv.DictReader(f):
            out.setdefault(e["task"], []).append(e["event"])
    return out


def test_submissions_start_die_and_resume_fail_alone_and_end_on_a_backend_without_ray(tmp_path):
    queue = tmp_path / "q"
    for name in ("ok", "flaky", "broken"):
        submit(tmp_path, queue, name)
    # ok runs while flaky dies, resumes and ends, and broken takes its slot and fails
    backend = ScriptedBackend(slots=2, scripts={"ok": ["done slowly"], "flaky": ["died", "done"], "broken": ["error"]})
    driver = Driver(queue, resource="slot", poll_s=0.0, log=lambda *_: None, backend=backend)
    assert driver.run() == 1  # one failed
    status = {t["name"]: t for t in json.loads((queue / "status.json").read_text())["tasks"]}
    assert {name: t["state"] for name, t in status.items()} == {"ok": "done", "flaky": "done", "broken": "failed"}
    assert status["broken"]["error"] == "ValueError: data.path: no such file"
    assert status["flaky"]["restarts"] == 1 == {r["name"]: r for r in task_queue.tasks(queue)}["flaky"]["restarts"]
    got = events(queue)
    assert got["ok"] == ["arrive", "place", "start", "done"]
    assert got["flaky"] == ["arrive", "place", "start", "died", "place", "resume", "done"]
    assert got["broken"] == ["arrive", "place", "start", "failed"]
    # the restart resumed from the checkpoint the dead ranks left; every launch was released; closed
    assert [(n, r) for n, _, r in backend.launches if n == "flaky"] == [("flaky", False), ("flaky", True)]
    assert backend.released == len(backend.launches) == 4 and backend.closed
    assert backend.most_held == 2  # ranks released as their submission ends: never more than the slots


def test_a_cancelled_submission_halts_at_its_checkpoint_and_says_how_to_resume(tmp_path):
    queue = tmp_path / "q"
    submit(tmp_path, queue, "long")
    backend = ScriptedBackend(slots=1, scripts={"long": ["until halted"]})
    driver = Driver(queue, resource="slot", poll_s=0.0, log=lambda *_: None, backend=backend)
    place = driver.place

    def place_then_cancel():  # cancelled by a user once it is running
        place()
        if driver.tasks["long"].state == "running" and driver.tasks["long"].micro_steps >= 3:
            task_queue.request_cancel(queue, "long")

    driver.place = place_then_cancel
    assert driver.run() == 0
    [status] = json.loads((queue / "status.json").read_text())["tasks"]
    assert status["state"] == "cancelled" and "alto tune --resume" in status["error"]
    assert events(queue)["long"] == ["arrive", "place", "start", "halt", "cancelled"]


def test_status_says_how_a_driver_that_is_gone_ended(tmp_path, capsys, monkeypatch):
    queue = tmp_path / "q"
    submit(tmp_path, queue, "s")
    driver = Driver(queue, resource="slot", poll_s=0.01, backend=ScriptedBackend(slots=1, scripts={}))
    polls = []

    def place():  # its second poll fails (it never places)
        polls.append(1)
        if len(polls) == 2:
            raise RuntimeError("the Ray cluster went away")

    monkeypatch.setattr(driver, "place", place)
    with pytest.raises(RuntimeError):
        driver.run()
    assert main(["status", "--queue", str(queue)]) == 0
    out = capsys.readouterr().out
    assert "driver not running" in out and "the driver failed: RuntimeError: the Ray cluster went away" in out, out
    # Killed while serving (SIGKILL): status.json still says serving; driver.log's last line is all there is.
    status = json.loads((queue / "status.json").read_text())
    task_queue.write_json(queue / "status.json", {**status, "driver": {**status["driver"], "state": "serving"}})
    (queue / "driver.log").write_text("[   3.0s] s: place 1 GPU(s)\n")
    assert main(["status", "--queue", str(queue)]) == 0
    out = capsys.readouterr().out
    assert "driver not running" in out and "driver.log ends: [   3.0s] s: place 1 GPU(s)" in out, out
