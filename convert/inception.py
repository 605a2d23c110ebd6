"""Convert pytorch-fid's FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth) into an l2c_jax directory.

`python convert/inception.py --help` for the usage.
"""

from l2c_jax.commands.convert_inception import run

if __name__ == "__main__":
    run()
