"""Run the CLI (`tpp_jax.main.entry`) with a fault injected: `python tests/fault_inject.py SPEC ARGS...`.

SPEC is `<workdir name>:<event>:<step>[:<signal>]`: the process sends itself SIGKILL (or the named signal, e.g. TERM /
INT) right after that point of the training loop in the run whose workdir has that name. Events: `step` (a train
step ran), `eval` (a mid-run evaluation and best/ kept), `checkpoint` (a periodic checkpoint saved),
`final_checkpoint` (the last step's checkpoint saved, before the final evaluation). The library itself has no hook:
the Trainer's methods are wrapped here.
"""
import os
import signal
import sys


def install(spec: str) -> None:
  from tpp_jax import engine

  name, event, at, *sig = spec.split(":")
  at, signum = int(at), getattr(signal, "SIG" + sig[0]) if sig else signal.SIGKILL

  def fire(trainer, ev, step):
    if trainer.workdir.name == name and ev == event and int(step) == at:
      os.kill(os.getpid(), signum)

  load = engine.Trainer.load

  def load_and_watch_steps(self):
    load(self)
    step_fn = self.train_step

    def train_step(state, batch, rng):
      before = int(state["step"])
      out = step_fn(state, batch, rng)
      fire(self, "step", before + 1)
      return out
    self.train_step = train_step

  save, eval_and_keep_best = engine.Trainer._save, engine.Trainer._eval_and_keep_best

  def save_and_watch(self, store, step, it, force=False):
    save(self, store, step, it, force)
    final = force and int(step) == int(self.config.steps)
    if final or not force:
      fire(self, "final_checkpoint" if final else "checkpoint", step)

  def eval_and_watch(self, step, *args):
    out = eval_and_keep_best(self, step, *args)
    fire(self, "eval", step)
    return out

  engine.Trainer.load, engine.Trainer._save = load_and_watch_steps, save_and_watch
  engine.Trainer._eval_and_keep_best = eval_and_watch


if __name__ == "__main__":
  install(sys.argv[1])
  from tpp_jax import main
  sys.argv = ["tpp_jax.main", *sys.argv[2:]]
  main.entry()
