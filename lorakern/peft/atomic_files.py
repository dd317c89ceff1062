"""An adapter's two files replaced together: written beside their final names,
flushed to disk, then renamed over the old ones, with the old weights put back
if the config cannot be installed after them."""
import json
import os
import secrets
import shutil

from .adapter_format import CONFIG_NAME, WEIGHTS_NAME


def write_adapter_files(path, config, tensors):
    """Both files of the adapter replaced, or neither: each is written to a temporary
    file beside it first, and if installing the config fails after the weights went
    in, the old weights are put back (a crash between the two renames is the only
    way to get a mixed pair)."""
    from safetensors.torch import save_file

    weights_file = os.path.join(path, WEIGHTS_NAME)
    config_file = os.path.join(path, CONFIG_NAME)
    weights_tmp = _temporary_name(path, WEIGHTS_NAME)
    config_tmp = _temporary_name(path, CONFIG_NAME)
    backup = None
    try:
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        _fsync(weights_tmp)
        with open(config_tmp, "x", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        backup = _backup_of(weights_file, path)
        os.replace(weights_tmp, weights_file)
        try:
            os.replace(config_tmp, config_file)
        except BaseException:
            _restore(weights_file, backup)
            backup = None
            raise
    finally:
        for leftover in (weights_tmp, config_tmp, backup):
            if leftover is not None and os.path.lexists(leftover):
                os.remove(leftover)
    _fsync_directory(path)


def _temporary_name(directory, name):
    """An unused name beside ``name``: os.replace is then a rename within one
    filesystem, which is atomic. Only a name: whoever writes the file creates it,
    with the usual permissions (mkstemp's would be owner-only)."""
    return os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")


def _backup_of(file, directory):
    """A second name for ``file`` (a hard link, or a copy where links are not
    supported), or None when there is no such file."""
    if not os.path.exists(file):
        return None
    backup = _temporary_name(directory, os.path.basename(file) + ".old")
    try:
        os.link(file, backup)
    except OSError:
        shutil.copy2(file, backup)
    return backup


def _restore(file, backup):
    if backup is None:  # there was no file before this save
        os.remove(file)
    else:
        os.replace(backup, file)


def _fsync(file):
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory):
    """Makes the renames durable where the OS allows syncing a directory (POSIX);
    elsewhere the renames are done all the same, only not flushed yet."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
