"""The package's import graph: no module of bit/ imports, even lazily inside a function, a module that
imports it back (a cycle means two modules are one concern, or a layer reaches above itself)."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'bit'


def module_name(path: pathlib.Path) -> str:
  parts = ['bit', *path.relative_to(PACKAGE).with_suffix('').parts]
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
  modules = {module_name(p): p for p in PACKAGE.rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        deps.add(node.module)
        deps |= {f'{node.module}.{a.name}' for a in node.names}
    # The package itself (bit/__init__.py, re-exports only) is imported by everything that says `from bit
    # import x`: count the module x, not the package.
    graph[name] = {d for d in deps if d in modules and d != name and d != 'bit'}
  graph.pop('bit', None)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state = {}  # name -> 'open' while on the DFS stack, 'done' after

  def visit(node, path):
    state[node] = 'open'
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 'open':
        return path[path.index(dep) :] + [dep]
      if dep not in state:
        found = visit(dep, path + [dep])
        if found:
          return found
    state[node] = 'done'
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start, [start])
      if found:
        return found
  return None


def test_find_cycle_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert {'bit.data', 'bit.data_sources', 'bit.train'} <= set(graph)
  assert 'bit.data_sources' in graph['bit.data']  # the walk sees real imports
  cycle = find_cycle(graph)
  assert cycle is None, ' -> '.join(cycle)


def test_the_walk_covers_the_tools_and_the_library_never_imports_them():
  graph = import_graph()
  tools = {
    'bit.tools.cli',
    'bit.tools.accuracy_grid',
    'bit.tools.speed',
    'bit.tools.input_speed',
    'bit.tools.demo',
  }
  assert tools <= set(graph)
  assert 'bit.tools.demo' in graph['bit.tools.accuracy_grid']  # the walk sees the tools' own imports
  library = {name: deps for name, deps in graph.items() if not name.startswith('bit.tools')}
  reaching = {name: sorted(d for d in deps if d.startswith('bit.tools')) for name, deps in library.items()}
  assert not {name: deps for name, deps in reaching.items() if deps}, 'library modules import bit.tools'


def test_import_bit_does_not_load_the_tools():
  code = 'import sys, bit; print(sorted(m for m in sys.modules if m.startswith("bit.tools")))'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == '[]'
