"""One-time set-up after install: build DeepSpeed's small C++ extension once, so parallel
workers never compile it concurrently at start (a cold build takes ~35 s and GBs)."""
from __future__ import annotations


def main() -> None:
    try:
        import deepspeed  # noqa: F401
        from deepspeed.ops.op_builder import ShareMemCommBuilder
        ShareMemCommBuilder().load(verbose=False)
        print("warmup: deepspeed shm extension ready")
    except Exception as e:  # not fatal: DeepSpeed falls back to plain collectives
        print(f"warmup: deepspeed extension not built ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
