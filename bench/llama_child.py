"""One llama.cpp build decoding bursts on command: run by bench/int8_interleaved.py with the python of
the venv that holds the build (two llama-cpp-python builds cannot be imported into one process).

    VENV/bin/python bench/llama_child.py '{"gguf": FILE, "ids": [...], "new": 64, "threads": 2}'

Imports only llama_cpp and the standard library (the peer venvs have nothing else). Prints one JSON
line when loaded and warmed up (version, system info, the ggml CPU library and its sha256), then one
JSON line {"tok_s": ...} per "go" line on stdin; any other line ends it. Decode tok/s of a burst:
tokens after the first over the time from the first to the last (the prompt's prefill is not in it).
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import llama_cpp

args = json.loads(sys.argv[1])
llm = llama_cpp.Llama(args["gguf"], n_threads=args["threads"], n_threads_batch=args["threads"], n_ctx=512,
                      verbose=False)


def burst() -> float:
    times = []
    for _ in llm.generate(args["ids"], top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == args["new"]:
            break
    return (len(times) - 1) / (times[-1] - times[0])


def cpu_library() -> dict:
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu*.so*"))
    lib = next((p for p in libs if not p.is_symlink()), None)
    return {"lib": lib.name, "sha256": hashlib.sha256(lib.read_bytes()).hexdigest()[:16]} if lib else {}


burst()  # warm-up
print(json.dumps({"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                  **cpu_library()}), flush=True)
for line in sys.stdin:
    if line.strip() != "go":
        break
    print(json.dumps({"tok_s": burst()}), flush=True)
