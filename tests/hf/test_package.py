"""The hf extra stays optional (issue 22, item 8)."""

import os
import subprocess
import sys

import pytest

hf = pytest.importorskip("attnkit.hf")


def test_import_without_transformers():
    # sys.modules[name] = None makes `import name` raise ImportError, as if it were not installed
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "import attnkit\n"
        "assert attnkit.attend is not None\n"
        "try:\n"
        "    import attnkit.hf\n"
        "except ImportError as err:\n"
        "    print('ERR', err)\n"
        "else:\n"
        "    print('imported')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'ERR attnkit.hf needs transformers' in out.stdout and 'pip install "attnkit[hf]"' in out.stdout


# cards whose policy needs more than the card's defaults (a table, a pattern)
def _extra_options(name):
    from attnkit.hf.duo import DuoPattern

    return {"hf-headwise": {"full_heads": [[True, False]]}, "hf-duo": {"pattern": DuoPattern([[0.2, 0.9]])}}.get(name, {})


def test_cards_are_hf_family_and_name_their_papers():
    import re

    from attnkit.hf.policies import METHODS

    names = [c.name for c in hf.CARDS]
    assert names[:3] == ["hf-full", "hf-streaming", "hf-headwise"] and len(set(names)) == len(names)
    assert all(n.startswith("hf-") for n in names)
    assert {c.family for c in hf.CARDS} == {c.kind for c in hf.CARDS} == {"hf"}
    assert [c.arxiv for c in hf.CARDS][:3] == [None, "2309.17453", "2410.10819"]
    assert all(re.fullmatch(r"\d{4}\.\d{4,5}", c.arxiv) for c in hf.CARDS[1:]), [c.arxiv for c in hf.CARDS]
    # every method apply() accepts by name has its card (so `attnkit list` shows it)
    assert {cls for cls in METHODS.values()} <= {c.layer for c in hf.CARDS}
    for card in hf.CARDS:
        policy = card.layer(**card.defaults, **_extra_options(card.name))
        assert isinstance(policy, hf.Policy)
        assert card.flop_count(1, 2048, 256, 4).attention_fwd > 0
    # the streaming card's FLOP model counts fewer pairs than full causal at long context
    full, stream = hf.CARDS[0].flop_count(1, 8192, 256, 4), hf.CARDS[1].flop_count(1, 8192, 256, 4)
    assert stream.attention_fwd < full.attention_fwd / 3


def test_cards_stay_out_of_the_layer_registry():
    import attnkit

    # the layer registry builds every card it holds as a layer: hf cards stay in attnkit.hf.CARDS
    assert not any(c.kind == "hf" for c in attnkit.mechanisms())
    assert not {c.name for c in hf.CARDS} & {c.name for c in attnkit.mechanisms()}
