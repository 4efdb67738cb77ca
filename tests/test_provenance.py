"""Where a run ran: package versions and the machine's CPU, as recorded beside training results."""

import os
import platform

import torch

from xmark_bundle.provenance import cpu_name, environment, package_versions


def test_package_versions_name_installed_and_missing_packages():
    versions = package_versions(["torch", "no-such-distribution-xmark"])
    assert versions == {
        "python": platform.python_version(),
        "torch": torch.__version__.split("+")[0],  # the distribution's version
        "no-such-distribution-xmark": "not installed",
    }


def test_cpu_name_reads_linux_cpuinfo_and_falls_back_without_it(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert cpu_name(cpuinfo) == "AMD EPYC 9654 96-Core Processor"
    fallback = platform.processor() or platform.machine() or "unknown"
    assert cpu_name(tmp_path / "missing") == fallback
    cpuinfo.write_text("processor\t: 0\nmodel name\t:\n")  # an empty model name is no name
    assert cpu_name(cpuinfo) == fallback


def test_environment_describes_this_process():
    env = environment(["numpy"])
    assert set(env["tools"]) == {"python", "numpy"}
    assert env["machine"]["cpu_count"] == os.cpu_count()
    assert env["machine"]["torch_threads"] == torch.get_num_threads()
    assert env["machine"]["torch_build"] == torch.__version__
    assert (env["machine"]["cuda_device"] is None) == (not torch.cuda.is_available())
