"""Dataset makers that ship with the package: the embedded digits tree (the demo's and the tests' real
data), synthetic ImageNet-like JPEG trees (throughput work) and the VIPriors subset of ImageNet.

Each module has a command line (`python -m fastvpd.datasets.digits --help`); in a checkout the same
commands are data_tools/make_digits.py, make_synthetic.py and vipriors_subset.py.
"""
