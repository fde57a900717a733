"""The files tracetailor reads and writes, and the life of an output directory.

Trace records and their files (traces.py), the teacher's top-K sidecar (topk.py), prompts in every
format a user brings (prompts.py), the chat rendering (chat.py), length fitting (lengths.py) and
RunDir (rundir.py). No model code, no config: nothing here imports anything above data/.
"""
