"""The report figures: PNGs of the size asked for, written atomically, and drawn without pyplot
(whose import is half of matplotlib's start-up)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path


def test_ranking_and_sweep_plots_are_pngs_drawn_without_pyplot(tmp_path):
    probe = textwrap.dedent(f"""
        import json, struct, sys
        from pathlib import Path
        from mlx_refusal.select import AlphaTrial, LayerScore, plot_ranking, plot_sweep
        out = Path({str(tmp_path)!r})
        scores = [LayerScore(layer=i, heuristic=0.1 * i, diff_norm=1.0 + i, relative_diff=0.05 * i) for i in range(6)]
        trials = [AlphaTrial(layer=l, multiple=m, alpha=10 * m, refusal_rate=min(1, m), coherence_rate=1 - m / 4,
                             mean_distinct3=0.9, example="...") for l in (12, 14) for m in (0.3, 0.5, 0.7)]
        sizes = {{}}
        for path in (plot_ranking(scores, out / "ranking.png"), plot_sweep(trials, out / "alpha_sweep.png")):
            head = path.read_bytes()[:24]
            assert head[:8] == b"\\x89PNG\\r\\n\\x1a\\n", head
            sizes[path.name] = struct.unpack(">II", head[16:24])
        print(json.dumps({{"sizes": sizes, "pyplot": "matplotlib.pyplot" in sys.modules}}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert out == {"sizes": {"ranking.png": [960, 480], "alpha_sweep.png": [960, 480]}, "pyplot": False}
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["alpha_sweep.png", "ranking.png"]  # no temp files
