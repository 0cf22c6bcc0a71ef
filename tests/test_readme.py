"""The README's code does what the README says.

- "In ten lines" runs as written, in a fresh process, and prints the shape of
  the momentum it claims (4096×128 instead of Adafactor's 4096×1024) and state
  sizes in about that ratio.
- "Set-up: two commands": each command creates and activates the virtual
  environment itself (a new terminal may run either one first), and CI
  (`.ci/run`) runs exactly the README's test command.
- It is at most 200 lines, and its relative links name files that exist.

Everything else the README once held lives in docs/ (checked by
tests/test_docs.py, the decision tables included: docs/choosing.md generates
them from the committed results when the site is built).
"""

import os
import re
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
  with open(os.path.join(_ROOT, 'README.md'), encoding='utf-8') as f:
    return f.read()


def _first_block(section: str, language: str) -> str:
  """The first ```language block under the `## section` heading."""
  text = _readme()
  start = text.index(f'\n## {section}\n')
  end = text.find('\n## ', start + 1)
  body = text[start:end if end != -1 else len(text)]
  match = re.search(rf'```{language}\n(.*?)```', body, re.S)
  assert match, f'no ```{language} block under "## {section}"'
  return match.group(1)


def test_ten_line_example_prints_what_it_claims():
  code = _first_block('In ten lines', 'python')
  assert 'print(' in code
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one device, as a reader's session would have
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, timeout=300, cwd=_ROOT, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3, out.stdout
  # e.g. "flora:     (4096, 128) 2.0 MiB of optimizer state"
  pattern = r'(\w+):\s+\((\d+), (\d+)\) ([\d.]+) MiB of optimizer state'
  rows = [re.fullmatch(pattern, line.strip()) for line in lines]
  assert all(rows), out.stdout
  (name0, *shape0, mib0), (name1, *shape1, mib1), (name2, *shape2, mib2) = (
      r.groups() for r in rows)
  assert (name0, name1, name2) == ('flora', 'adafactor', 'flora8')
  assert tuple(map(int, shape0)) == (4096, 128)
  assert tuple(map(int, shape1)) == tuple(map(int, shape2)) == (4096, 1024)
  # The momentum dominates the states: float32 sketch 2 MiB, full 16 MiB,
  # 8-bit codes 4 MiB plus one float32 scale per 256 entries.
  assert abs(float(mib0) - 2.0) < 0.1 and abs(float(mib1) - 16.0) < 0.1
  assert abs(float(mib2) - 4.07) < 0.1
  # The comment in the example says the same, and so does the output the
  # README shows after it.
  assert "momentum of 'w': 4096×128 instead of 4096×1024" in code
  text = _readme()
  after = text[text.index(code) + len(code):]
  shown = re.match(r'```\s*prints\s*```\n(.*?)```', after, re.S)
  assert shown, 'the README shows no output after the example'
  assert shown.group(1).strip() == out.stdout.strip()


def test_setup_commands_are_self_contained_and_ci_runs_the_test_command():
  block = _first_block('Set-up: two commands', 'bash')
  commands = [l for l in block.splitlines() if l and not l.startswith('#')]
  assert len(commands) == 2, block
  activate = 'python -m venv .venv && . .venv/bin/activate && '
  for command in commands:
    assert command.startswith(activate), command
  test_command = commands[1][len(activate):]
  assert 'pytest' in test_command and '.[test]' in test_command
  with open(os.path.join(_ROOT, '.ci', 'run'), encoding='utf-8') as f:
    ci = f.read().splitlines()
  # The line after the comment naming it, character for character.
  at = next(i for i, l in enumerate(ci) if l.startswith("# The README's test"))
  assert ci[at + 1] == test_command, (ci[at + 1], test_command)
  # The tests that command leaves out (pyproject's addopts: not slow) run
  # in CI too.
  assert 'python -m pytest -n 2 -q -m slow' in ci



def test_readme_is_short_and_its_links_into_the_repository_resolve():
  # Issue 31: a newcomer reads it in five minutes; the rest is in docs/.
  text = _readme()
  assert len(text.splitlines()) <= 200, len(text.splitlines())
  targets = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', text)
  local = [t for t in targets if not re.match(r'[a-z]+://', t)]
  assert local, 'the README links to no page of docs/'
  missing = [t for t in local if not os.path.exists(os.path.join(_ROOT, t))]
  assert not missing, f'README links to files that do not exist: {missing}'
