"""Training throughput of the quick start's model with 1 and 2 torch threads, on an idle and on a busy machine.

    .venv/bin/python benchmarks/bench_train_threads.py        # about 2 minutes on 2 cores

Why: ``biformer train`` uses one torch thread per process by default. With two threads on two cores, one
core taken by anything else (another training, a test suite) makes every OpenMP barrier wait for a
descheduled thread; this measures how much that costs, side by side in one run. Each configuration runs
in a fresh process (thread pools and the OpenMP wait policy are fixed at start-up): biformer_nano as the
quick start builds it (1 channel, 32 px, 10 classes), AdamW steps at batch 128, images/s over 15 steps
after 3 warm-up steps (a mean, so stalls count). "busy" = a pure-Python busy loop (this script's own child
process) holds one core; other users of the machine are not controlled: see the load averages.
Prints a markdown table and the load average before and after.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

STEP_SCRIPT = """
import time, sys, torch, timm, biformer.train
torch.set_num_threads(int(sys.argv[1]))
model = timm.create_model("biformer_nano", num_classes=10, in_chans=1, n_win=2, topks=[2, 2, 4, -2])
optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
images, labels = torch.randn(128, 1, 32, 32), torch.randint(0, 10, (128,))
def step():
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(15):
    step()
print(15 * 128 / (time.perf_counter() - start))
"""


CONFIGURATIONS = (
    (1, {}, "1 thread (default)"),
    (2, {}, "2 threads"),
    (2, {"OMP_WAIT_POLICY": "PASSIVE"}, "2 threads, OMP_WAIT_POLICY=PASSIVE"),
)


def images_per_second(threads: int, environment: dict[str, str]) -> float:
    output = subprocess.run([sys.executable, "-c", STEP_SCRIPT, str(threads)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, **environment}, check=True).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    print(f"load average before: {os.getloadavg()}")
    rows = []
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            for threads, environment, label in CONFIGURATIONS:
                rows.append((label, "yes" if busy else "no", images_per_second(threads, environment)))
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    print("\n| torch threads | our busy loop on one core | training images/s |\n|---|---|---|")
    for label, state, value in rows:
        print(f"| {label} | {state} | {value:.0f} |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
