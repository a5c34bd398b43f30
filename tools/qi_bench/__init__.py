"""Library code of the measuring tools in tools/ (the scripts parse options and call it).

- ``measure``: timing in interleaved rounds, peak memory, FLOPs, profiles, FrozenBN calibration;
- ``models``, ``runner``, ``report``: tools/benchmark.py's candidates, its run and its report;
- ``reference``: the MMDetection 3.3.0 reference's venv and process (tools/reference_check.py,
  tools/benchmark.py --reference);
- ``results``: tools/results_table.py's runs, statistics and Markdown table;
- ``parity``: tools/parity_check.py's comparison with the reference's arrays.

Import with ``tools/`` on ``sys.path`` (the scripts add it; pytest has it from setup.cfg).
"""
