"""Child process for test_neurons.py: collect neuron statistics on a tiny checkpoint.

    python neurons_resume_check.py CHECKPOINT_DIR CKPT OUT.npz [KILL_AFTER_BATCH]

With KILL_AFTER_BATCH the process SIGKILLs itself right after that batch is added (no clean-up,
like a machine going away); run again without it, it resumes from the last orbax save.
"""

import os
import signal
import sys

import numpy as np

import jaxlens
from jaxlens.methods import neurons as N


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [b % 100 + 2 for b in text.encode()]


directory, checkpoint, out = sys.argv[1:4]
kill_after = int(sys.argv[4]) if len(sys.argv) > 4 else None
model = jaxlens.load(directory, tokenizer=ByteTokenizer())
corpus = {"fr": N.Corpus(tuple(("", f"le chat {i} dort sur le tapis") for i in range(30))),
          "de": N.Corpus(tuple(("frage", f"die katze {i}") for i in range(30)))}
batches = N.corpus_batches(model, corpus, seq_len=16, batch_size=4)


def die(i):
    if i == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


state = N.collect(model, batches, checkpoint_dir=None if checkpoint == "-" else checkpoint, save_every=3,
                  with_max=True, on_batch=die, progress=False)
np.savez(out, **state)
print(f"done {len(batches)} batches")
