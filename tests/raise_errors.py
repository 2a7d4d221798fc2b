"""Raises each kind of user error the extension reports, in one fresh process, after CUDA is
initialised where there is a GPU, and checks that each arrives as its Python exception.

On the first GPU run a user error raised from C++ killed the process (docs/gpu-validation.md):
tests/test_errors.py runs this script in a subprocess, so that such a death fails one test
instead of the suite, and .ci/gpu-validate runs it, and again under cuda-gdb if it fails, which
prints the native stack of a fault. Prints one line per case and "all errors raised" at the end.

    python tests/raise_errors.py
"""

import torch

import focal_cuda

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def expect(error, call, label):
    try:
        call()
    except error as raised:
        print(f"{label}: {type(raised).__name__}: {str(raised).splitlines()[0][:100]}", flush=True)
        return
    raise AssertionError(f"{label}: no {error.__name__} raised")


def main():
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda").sum().item()  # the driver loaded and a context made first
    expect(RuntimeError, lambda: torch.zeros(2) + torch.zeros(3), "torch's own C++ error")
    for device in DEVICES:
        x = torch.zeros(4, 5, device=device)
        ops = focal_cuda._C
        expect(ValueError, lambda: ops.sigmoid_focal_loss_forward(
            x, x, None, None, 0, [2.0, 2.0], 0, -100, 0.0, False, 0), f"{device}: op argument")
        expect(RuntimeError, lambda: ops.sigmoid_focal_loss_backward(
            torch.zeros(3, device=device), x, torch.tensor(20, device=device), 0), f"{device}: backward op")
        expect(ValueError, lambda: focal_cuda.sigmoid_focal_loss(x, torch.zeros(4, 3, device=device)),
               f"{device}: public function")
        expect(ValueError, lambda: torch.ops.focal_cuda.sigmoid_focal_loss_forward(
            x, x, None, None, 0, [0.25, -1.0], 0, -100, 0.0, False, 0), f"{device}: dispatcher")
    # The CPU label check (on CUDA a bad label is a device-side assertion, which ends the context).
    expect(ValueError, lambda: focal_cuda.sigmoid_focal_loss(torch.zeros(3, 5), torch.tensor([0, 9, 1])),
           "cpu: bad label")
    print("all errors raised", flush=True)


if __name__ == "__main__":
    main()
