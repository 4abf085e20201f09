"""The `taper` command. Its own subcommands (setup, serve, router, demo) live here;
others are plugged in by entry points of the group `taper.commands` (the
benchmarks register `bench`, `sim` and `profile` there), so this package never
imports the benchmarks."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

PLUGIN_GROUP = "taper.commands"


def _setup(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="taper setup",
                                description="Build the CPU assets (libcuda stand-in, tiny model).")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model")
    ns = p.parse_args(argv)
    from sglang_taper.cpu import assets

    lib = None
    if assets.has_gpu():
        from sglang_taper.cpu.tiny_model import build_tiny_model

        model = build_tiny_model(assets.tiny_model_dir(), seed=ns.seed)
    else:
        lib, model = assets.ensure_cpu_assets(seed=ns.seed)
    print(f"[setup] tiny model: {model}")
    if lib is not None:
        print(f"[setup] libcuda stand-in: {lib}/libcuda.so.1")
    return 0


def _serve(argv: list[str]) -> int:
    from sglang_taper.serve import serve

    return serve(argv)


def _router(argv: list[str]) -> int:
    from sglang_taper.router import main

    return main(argv)


COMMANDS = {
    "setup": (_setup, "build local assets (CPU libcuda stand-in, tiny model)"),
    "serve": (_serve, "start the SGLang server with TAPER enabled"),
    "router": (_router, "start SGLang's router in front of taper workers, a program per worker"),
}


def _demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="taper demo",
                                description="Start a TAPER server and run a fork program.")
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="passed to taper serve")
    ns = p.parse_args(argv)
    import time

    from sglang_taper.server import ServerProcess

    t0 = time.monotonic()
    with ServerProcess(ns.serve_args) as server:
        print(f"[demo] server ready in {time.monotonic() - t0:.1f} s at {server.url}", flush=True)
        import sglang as sgl

        from programs.fork_demo import fork_demo

        sgl.set_default_backend(sgl.RuntimeEndpoint(server.url))
        t1 = time.monotonic()
        state = fork_demo.run(question="How many paths lead home?", width=ns.width,
                              branch_tokens=ns.tokens)
        for i, (text, meta) in enumerate(state.ret_value):
            print(f"[demo] branch {i}: prompt {meta['prompt_tokens']} tokens, "
                  f"{meta['cached_tokens']} from the prefix cache: {text!r}")
        print(f"[demo] summary: {state['summary']!r}")
        print(f"[demo] program finished in {time.monotonic() - t1:.2f} s")
    return 0


COMMANDS["demo"] = (_demo, "start a server and run a fork program against it")


def _plugins() -> dict:
    """Subcommands registered by other packages: name -> entry point."""
    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name not in COMMANDS}


def _describe(ep) -> str:
    """The first line of the subcommand's module docstring."""
    try:
        module = sys.modules[ep.load().__module__]
    except Exception as e:  # a broken plugin must not break `taper --help`
        return f"(cannot load: {type(e).__name__}: {e})"
    doc = (module.__doc__ or "").strip()
    first = doc.splitlines()[0] if doc else ""
    return first.split(": ", 1)[-1].rstrip(".")  # "`taper x`: what it does." -> what


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plugins = _plugins()
    if not argv or argv[0] in ("-h", "--help") or (argv[0] not in COMMANDS
                                                   and argv[0] not in plugins):
        lines = [f"  {name:8s} {help_}" for name, (_, help_) in COMMANDS.items()]
        lines += [f"  {name:8s} {_describe(ep)}" for name, ep in sorted(plugins.items())]
        print("usage: taper <command> [args]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] in COMMANDS:
        fn, _ = COMMANDS[argv[0]]
    else:
        fn = plugins[argv[0]].load()
    return fn(argv[1:])
