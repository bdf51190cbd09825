"""Command-line entry points (``iomm-train``, ``iomm-sample``, ``iomm-eval``, ``iomm-demo``,
``iomm-convert``, ``iomm-plan``) and what the absl ones share: ``run`` (``--help`` with the
command's own flags, exit 0; one-line errors with exit status 2 for a bad flag, a config key
that is not in the experiment file, a config value ``loading.validate`` refuses or a bad flag
combination, as the argparse commands give), flag spelling with dashes, the SIGTERM exit status
and the out-of-vocabulary prompt warning.

Nothing here imports JAX at module level."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

USAGE_ERROR = 2  # exit status of bad user input (argparse's, and iomm-plan/-convert/-prepare's)
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
FULL_HELP_ARGS = ("--helpfull", "-helpfull")
WIDTH = 100
CONFIG_FLAG = "config"  # the experiment-file flag (config_flags.DEFINE_config_file) of iomm-train


def absl_argv(argv: list[str] | None = None) -> list[str]:
  """``argv`` with dashes in flag names turned into absl's underscores (``--num-per-prompt=4``
  -> ``--num_per_prompt=4``, ``--no-ema`` -> ``--noema``); values and ``--config...`` overrides
  are left alone."""
  out = []
  for i, arg in enumerate(sys.argv if argv is None else argv):
    if i and arg.startswith("--") and len(arg) > 2:
      name, eq, value = arg[2:].partition("=")
      if not name.startswith("config"):
        if name.startswith("no-"):  # absl negates booleans as --noflag
          name = "no" + name[3:]
        arg = "--" + name.replace("-", "_") + eq + value
    out.append(arg)
  return out


@contextlib.contextmanager
def exit_on_preemption():
  """Inside: a run stopped by SIGTERM (``loop.Preempted``, raised once its checkpoint is saved)
  ends the process with its one-line message and exit status 75 (EX_TEMPFAIL), so a shell
  chain (``set -e``), a sweep or a scheduler never takes it for a finished run."""
  from iomm_jax.train import loop

  try:
    yield
  except loop.Preempted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


def define_distributed_flags() -> Callable[[], bool]:
  """Defines ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (iomm-train's
  multi-process flags) for the calling entry point; returns the function that joins the run they,
  or ``$IOMM_COORDINATOR`` / ``$IOMM_NUM_PROCESSES`` / ``$IOMM_PROCESS_ID`` or a SLURM step,
  describe (``runtime.initialize_distributed``; True if it joined one), to call before anything
  touches a JAX backend. An incomplete or inconsistent set is a usage error."""
  from absl import app, flags

  from iomm_jax import runtime

  addr = flags.DEFINE_string(
    "coordinator_address",
    None,
    f"multi-process: host:port of process 0 (${runtime.COORDINATOR_ENV})",
  )
  num = flags.DEFINE_integer(
    "num_processes", None, f"multi-process: number of processes (or ${runtime.NUM_PROCESSES_ENV})"
  )
  pid = flags.DEFINE_integer(
    "process_id", None, f"multi-process: this process's index (or ${runtime.PROCESS_ID_ENV})"
  )

  def join() -> bool:
    try:
      return runtime.initialize_distributed(addr.value, num.value, pid.value)
    except ValueError as e:  # the flags' or variables' values: one line, no traceback
      raise app.UsageError(str(e)) from None

  return join


def run(main: Callable[[list[str]], Any], prog: str, module: str, required: Sequence[str] = ()):
  """``absl.app.run(main)`` for the command ``prog`` whose flags ``module`` defines (with
  ``required`` ones). ``--help`` (``-h``, ``-?``, ``--helpshort``) prints ``module``'s docstring
  and the command's own flags and exits 0; ``--helpfull`` adds every library's flags after them.
  A flag that does not parse, a ``--config.KEY`` override of a key the experiment file lacks
  (named in full, with the nearest valid key) and an ``app.UsageError`` from ``main`` print one
  line, ``prog: error: ...``, and exit with ``USAGE_ERROR``."""
  from absl import app, flags

  argv = absl_argv()
  args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
  if any(a in HELP_ARGS or a in FULL_HELP_ARGS for a in args):
    full = any(a in FULL_HELP_ARGS for a in args)
    print(command_help(prog, module, required, full), flush=True)
    sys.exit(0)
  flags.mark_flags_as_required(list(required))

  def parse(argv: list[str]) -> list[str]:
    """absl's parse of ``argv``; what fails is one line naming the flag or key."""
    missing = missing_config_file(argv) if CONFIG_FLAG in flags.FLAGS else None
    if missing is not None:  # config_flags would defer it to a traceback at first use
      usage_error(prog, missing)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      head, traceback, tail = str(e).partition("Traceback (most recent call last):")
      usage_error(prog, head + tail.strip().splitlines()[-1] if traceback else str(e))
    except (AttributeError, KeyError):  # ml_collections: an override of a key the config lacks
      message = bad_config_override(argv)
      if message is None:
        raise
      usage_error(prog, message)

  def checked_main(argv: list[str]) -> Any:
    """``main``, its usage errors and the config values ``loading.validate`` refuses one line."""
    try:
      return main(argv)
    except app.UsageError as e:
      usage_error(prog, str(e))
    except ValueError as e:
      from iomm_jax.configs import loading

      if not isinstance(e, loading.ConfigError):
        raise
      usage_error(prog, str(e), hint=None)

  app.run(checked_main, argv=argv, flags_parser=parse)


def usage_error(prog: str, message: str, hint: str | None = "--help lists the flags") -> None:
  """Prints ``prog: error: message (hint)`` as one line on stderr and exits with
  ``USAGE_ERROR``."""
  line = " ".join(message.split()) + (f" ({hint})" if hint else "")
  print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR)


def _config_spec(argv: Sequence[str], name: str = CONFIG_FLAG) -> str | None:
  """The value of ``--config`` in ``argv`` (the last one given), or None."""
  spec = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == f"--{name}" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith(f"--{name}="):
      spec = arg.partition("=")[2]
  return spec


def missing_config_file(argv: Sequence[str], name: str = CONFIG_FLAG) -> str | None:
  """``argument --config: experiment file 'x.py' does not exist`` (iomm-plan's words) when
  ``--config`` names no file."""
  spec = _config_spec(argv, name)
  if spec is None:
    return None
  path = spec.partition(":")[0]
  if os.path.isfile(path):
    return None
  return f"argument --{name}: experiment file {path!r} does not exist"


def bad_config_override(argv: Sequence[str], name: str = CONFIG_FLAG) -> str | None:
  """``argument --config.KEY: unknown config key 'KEY'; did you mean ...?`` (iomm-plan's words)
  for the first override in ``argv`` of a key that the experiment file of ``--config`` does not
  have; None when there is none (or the experiment file itself does not load)."""
  spec = _config_spec(argv, name)
  if spec is None:
    return None
  from iomm_jax.configs import loading

  try:
    config = loading.load_config(spec)
  except Exception:  # the config flag's own error is the one to show
    return None
  for arg in argv[1:]:
    m = re.match(rf"^--?(?:no)?{name}\.([^=]+)", arg)
    if m is None:
      continue
    try:
      loading.get_dotted(config, m.group(1))
    except KeyError as e:
      return f"argument --{name}.{m.group(1)}: {e.args[0]}"
  return None


def command_help(prog: str, module: str, required: Sequence[str] = (), full: bool = False) -> str:
  """The ``--help`` text: ``module``'s docstring, then the flags it (and this package, for the
  shared multi-process flags) defines, in definition order; ``full`` adds every other module's
  flags (absl, JAX, the libraries) after them."""
  from absl import flags

  doc = (sys.modules[module].__doc__ or prog).replace("``", "").strip()
  own = [*flags.FLAGS.get_flags_for_module(module), *flags.FLAGS.get_flags_for_module(__name__)]
  lines = [doc, "", f"flags of {prog} (spelt with dashes or underscores):"]
  for flag in dict.fromkeys(own):
    lines += _flag_help(flag, flag.name in required)
    if flag.name == CONFIG_FLAG:
      text = (
        f"override any key of the experiment file, e.g. --{flag.name}.optim.lr=3e-4 (every key, "
        "with its default and a comment: iomm_jax/configs/base.py)"
      )
      lines += _wrap(f"--{flag.name}.KEY=VALUE", text)
  if full:
    mine = {module, __name__}
    for other, _ in sorted(flags.FLAGS.flags_by_module_dict().items()):
      if other not in mine:
        lines += ["", flags.FLAGS.module_help(other)]
  else:
    lines += ["", "--helpfull also lists the flags of absl, JAX and the other libraries."]
  return "\n".join(lines)


def _flag_help(flag: Any, required: bool) -> list[str]:
  """``--[no-]name: help (default: x)``, wrapped (absl starts an enum's help with its values)."""
  name = flag.name.replace("_", "-")
  head = f"--[no-]{name}" if flag.boolean else f"--{name}"
  if required:
    tail = "(required)"
  elif flag.default is None or flag.default == "":
    tail = ""
  else:
    tail = f"(default: {str(flag.default).lower() if flag.boolean else flag.default})"
  return _wrap(head, flag.help or "", tail)


def _wrap(head: str, text: str, tail: str = "") -> list[str]:
  """``  head: text tail`` wrapped to ``WIDTH`` columns, continuation lines indented, ``tail``
  kept whole."""
  lines = textwrap.wrap(f"{head}: {text}", WIDTH, initial_indent="  ", subsequent_indent="      ")
  if tail and len(lines[-1]) + 1 + len(tail) <= WIDTH:
    lines[-1] += " " + tail
  elif tail:
    lines.append("      " + tail)
  return lines


def warn_unknown_words(prog: str, tokenizer: Any, prompts: Sequence[str], limit: int = 10) -> int:
  """One stderr line per distinct prompt holding words ``tokenizer`` does not know
  (``unknown_words``: see ``data.tokenizer.Tokenizer.unknown_words`` for the rule), naming them;
  after ``limit`` such lines, one line counting the rest. Process 0 alone writes. Returns the
  number of prompts with unknown words. Such prompts are still sampled: the warning says the
  model never learnt those words, so the images cannot follow them."""
  import jax

  bad = {}
  for prompt in dict.fromkeys(prompts):
    words = tokenizer.unknown_words(prompt)
    if words:
      bad[prompt] = words
  if jax.process_index() != 0:
    return len(bad)
  for prompt, words in list(bad.items())[:limit]:
    listed = ", ".join(repr(w) for w in words)
    plural = "s" if len(words) > 1 else ""
    print(
      f"{prog}: warning: prompt {prompt!r} has out-of-vocabulary word{plural} {listed}: "
      "the tokenizer learnt no such word from the training captions",
      file=sys.stderr,
      flush=True,
    )
  if len(bad) > limit:
    print(
      f"{prog}: warning: {len(bad) - limit} more prompts have out-of-vocabulary words",
      file=sys.stderr,
      flush=True,
    )
  return len(bad)
