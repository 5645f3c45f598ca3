import nbformat

from course_utils.notebooks import REPO, scrub_paths


def test_scrub_paths_replaces_the_checkout_path_in_every_kind_of_output(tmp_path):
    root = tmp_path / "checkout"
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text=f"artifacts go to {root}/runs/tiny\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": f"PosixPath('{root}/runs')"}, execution_count=1),
        nbformat.v4.new_output("error", ename="E", evalue="x", traceback=[f"File {root}/course_utils/a.py", "line 2"]),
    ]
    cell.source = f"# {root} in the source stays"  # only outputs are rewritten
    nb.cells.append(cell)
    assert scrub_paths(nb, root) == 3
    out = cell.outputs
    assert out[0]["text"] == f"artifacts go to {REPO}/runs/tiny\n"
    assert out[1]["data"]["text/plain"] == f"PosixPath('{REPO}/runs')"
    assert out[2]["traceback"][0] == f"File {REPO}/course_utils/a.py"
    assert str(root) in cell.source
