from html.parser import HTMLParser

import pytest

from labvm_spawner.errors import LabVMError
from labvm_spawner.form import format_bytes, parse_form, render_form, validate_options
from labvm_spawner.policy import GpuPolicy, Limits

G = 1024**3
M = 1024**2
A100 = "NVIDIA A100 80GB PCIe"
A6000 = "NVIDIA RTX A6000"
LIMITS = Limits(
    cpus=4, mem_bytes=16 * G, pids=4096, blkio_weight=None, io_read_bps=100 * M, io_write_bps=None
)
MIXED_TOTAL = {A100: 4, A6000: 4}


class Form(HTMLParser):
    """What a browser would offer: selects with their options, and the limits table."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.selects: dict[str, list[tuple[str, str, bool]]] = {}
        self.rows: dict[str, str] = {}
        self.text: list[str] = []
        self._select = None
        self._option = None
        self._cell: list[str] | None = None
        self._row: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "select":
            self._select = a["name"]
            self.selects[self._select] = []
        elif tag == "option":
            self._option = [a["value"], "", "selected" in a]
        elif tag in ("th", "td"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None
        elif tag == "option":
            self.selects[self._select].append(tuple(self._option))
            self._option = None
        elif tag in ("th", "td"):
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            self.rows[self._row[0]] = self._row[1]
            self._row = []

    def handle_data(self, data):
        if self._option is not None:
            self._option[1] += data
        elif self._cell is not None:
            self._cell.append(data)
        else:
            self.text.append(data)

    def values(self, name):
        return [v for v, _, _ in self.selects[name]]


def test_count_capped_by_policy_and_free():
    f = Form(render_form(LIMITS, GpuPolicy(2, None, False), {A100: 3}, {A100: 4}))
    assert f.values("gpus") == ["0", "1", "2"]
    assert [s for _, _, s in f.selects["gpus"]] == [True, False, False]  # 0 preselected
    assert "gpu_model" not in f.selects  # one model: nothing to choose
    f = Form(render_form(LIMITS, GpuPolicy(8, None, False), {A100: 3}, {A100: 4}))
    assert f.values("gpus") == ["0", "1", "2", "3"]


def test_no_gpus_granted_or_free():
    f = Form(render_form(LIMITS, GpuPolicy(0, None, False), {A100: 4}, {A100: 4}))
    assert f.values("gpus") == ["0"]
    assert "not granted GPUs" in "".join(f.text)
    f = Form(render_form(LIMITS, GpuPolicy(4, None, False), {A100: 0}, {A100: 4}))
    assert f.values("gpus") == ["0"]
    assert "taken right now" in "".join(f.text)
    f = Form(render_form(LIMITS, GpuPolicy(4, None, False), {}, {}))
    assert f.values("gpus") == ["0"]


def test_model_select_when_several_allowed():
    free = {A100: 1, A6000: 3}
    f = Form(render_form(LIMITS, GpuPolicy(8, None, False), free, MIXED_TOTAL))
    assert f.values("gpu_model") == ["", A100, A6000]
    labels = [label for _, label, _ in f.selects["gpu_model"]]
    assert labels == ["Any model", f"{A100} (1 of 4 free)", f"{A6000} (3 of 4 free)"]
    assert f.values("gpus") == [str(n) for n in range(5)]  # any model: 4 free in all

    # Restricted to both models: one must be chosen, at most 3 of one model are free.
    f = Form(render_form(LIMITS, GpuPolicy(8, [A6000, A100], False), free, MIXED_TOTAL))
    assert f.values("gpu_model") == [A100, A6000]
    assert f.values("gpus") == ["0", "1", "2", "3"]


def test_model_restriction_hides_other_models():
    f = Form(render_form(LIMITS, GpuPolicy(4, [A6000], False), {A100: 4, A6000: 2}, MIXED_TOTAL))
    assert "gpu_model" not in f.selects
    assert f.values("gpus") == ["0", "1", "2"]
    assert A100 not in "".join(f.text)
    assert f"GPU model: {A6000}" in "".join(f.text)


def test_limits_table_in_human_units():
    f = Form(render_form(LIMITS, GpuPolicy(1, None, False), {A100: 1}, {A100: 1}))
    assert f.rows == {
        "CPUs": "4",
        "Memory": "16 GiB",
        "Processes": "4096",
        "Disk IO weight": "default",
        "Disk read": "100 MiB/s",
        "Disk write": "unlimited",
        "Disk space": "unlimited",
        "Stored layer": "unlimited",
    }
    half = Limits(0.5, 1536 * M, 100, 500, None, 20 * M, disk_bytes=50 * G, store_bytes=80 * G)
    f = Form(render_form(half, GpuPolicy(0, None, False), {}, {}))
    assert f.rows["CPUs"] == "0.5"
    assert f.rows["Memory"] == "1.5 GiB"
    assert f.rows["Disk IO weight"] == "500"
    assert f.rows["Disk write"] == "20 MiB/s"
    assert f.rows["Disk space"] == "50 GiB"
    assert f.rows["Stored layer"] == "80 GiB"


def test_everything_escaped():
    evil = '"><script>alert(1)</script>'
    html = render_form(LIMITS, GpuPolicy(2, None, False), {evil: 1, A100: 1}, {evil: 1, A100: 1})
    assert "<script>" not in html
    f = Form(html)
    assert evil in f.values("gpu_model")  # survives as data, not markup


@pytest.mark.parametrize(
    "n,text",
    [(0, "0 B"), (1023, "1023 B"), (8 * G, "8 GiB"), (1536 * M, "1.5 GiB"), (2**40, "1 TiB")],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_parse_form():
    assert parse_form({"gpus": ["2"], "gpu_model": [A100], "_xsrf": ["tok"]}) == {
        "gpus": 2,
        "gpu_model": A100,
    }
    assert parse_form({"gpus": ["0"], "gpu_model": [""]}) == {"gpus": 0, "gpu_model": None}
    assert parse_form({}) == {"gpus": 0, "gpu_model": None}
    with pytest.raises(LabVMError, match="GPU count must be a whole number, got 'two'"):
        parse_form({"gpus": ["two"]})


POLICY = GpuPolicy(max_gpus=2, models=None, sharing=False)
AVAILABLE = [A100, A100, A6000]


def test_validate_ok():
    assert validate_options({"gpus": 2, "gpu_model": A6000}, POLICY, AVAILABLE) == (2, A6000)
    assert validate_options({"gpus": "1"}, POLICY, AVAILABLE) == (1, None)
    assert validate_options({}, POLICY, AVAILABLE) == (0, None)
    assert validate_options({"gpus": 0, "gpu_model": ""}, POLICY, AVAILABLE) == (0, None)
    # A single allowed model is implied.
    assert validate_options({"gpus": 1}, GpuPolicy(2, [A100], False), AVAILABLE) == (1, A100)


@pytest.mark.parametrize(
    "options,policy,message",
    [
        ({"gpus": 3}, POLICY, "You may use at most 2 GPUs; 3 requested"),
        ({"gpus": 1}, GpuPolicy(0, None, False), "Your account is not granted GPUs; 1 requested"),
        ({"gpus": -1}, POLICY, "GPU count must not be negative"),
        ({"gpus": "-1"}, POLICY, "GPU count must not be negative"),
        ({"gpus": 1.5}, POLICY, "GPU count must be a whole number, got 1.5"),
        ({"gpus": "two"}, POLICY, "GPU count must be a whole number, got 'two'"),
        ({"gpus": True}, POLICY, "GPU count must be a whole number, got True"),
        ({"gpus": 1, "gpu_model": "NVIDIA H100"}, POLICY, "Unknown GPU model 'NVIDIA H100'"),
        ({"gpus": 1, "gpu_model": 7}, POLICY, "GPU model must be a model name"),
        (
            {"gpus": 1, "gpu_model": A6000},
            GpuPolicy(2, [A100], False),
            f"Your account may not use GPU model '{A6000}'",
        ),
        ({"gpus": 1, "image": "evil"}, POLICY, "Unknown server option(s): 'image'"),
        ({"gpus": 1}, GpuPolicy(2, [A100, A6000], False), "Choose a GPU model: one of"),
        ({"gpus": 1}, GpuPolicy(2, ["NVIDIA H100"], False), "No GPU model your account may use"),
    ],
)
def test_validate_refusals(options, policy, message):
    with pytest.raises(LabVMError) as e:
        validate_options(options, policy, AVAILABLE)
    assert message in str(e.value)


def test_validate_on_node_without_gpus():
    with pytest.raises(LabVMError, match="This node has no GPUs"):
        validate_options({"gpus": 1}, POLICY, [])
    assert validate_options({"gpus": 0}, POLICY, []) == (0, None)


def test_form_round_trip():
    # What the browser posts back from the rendered form passes validation.
    policy = GpuPolicy(4, None, False)
    f = Form(render_form(LIMITS, policy, {A100: 2, A6000: 4}, MIXED_TOTAL))
    formdata = {"gpus": [f.values("gpus")[-1]], "gpu_model": [f.values("gpu_model")[2]]}
    options = parse_form(formdata)
    assert validate_options(options, policy, list(MIXED_TOTAL)) == (4, A6000)
