"""An adapter's two files replaced together.

Each file is written to a hidden temporary beside its final name, flushed to
disk, then renamed over the old one (a rename within one directory is atomic):
the weights first, then the config. What the directory can hold afterwards:

- after a save that raised (disk full, a rename refused, ...): the old pair as it
  was, the old weights put back if the config could not be installed after them,
  and no temporary files;
- after a process killed between the two renames: the new weights beside the old
  config. The weights carry the layer settings of the config written with them
  (``adapter_format.settings_record``, in the safetensors metadata) and
  ``load_adapter`` refuses a config that disagrees with them. PEFT's
  ``from_pretrained`` reads no such record: only ``load_adapter`` detects the pair;
- after a process killed at any point: its temporaries, named after the host and
  the process id. The next save into the directory removes those of processes
  no longer running on this host (on POSIX systems; elsewhere, and those of other
  hosts, they are kept: a running save must keep its files).
"""
import json
import os
import re
import secrets
import shutil
import socket

from .adapter_format import CONFIG_NAME, SETTINGS_METADATA_KEY, WEIGHTS_NAME, settings_record


def write_adapter_files(path, config, tensors):
    """Both files of the adapter replaced (see the module docstring for what a failure
    or a kill leaves): ``config`` as ``adapter_config.json``, ``tensors`` as
    ``adapter_model.safetensors`` carrying the config's layer settings."""
    from safetensors.torch import save_file

    remove_stale_temporaries(path)
    weights_file = os.path.join(path, WEIGHTS_NAME)
    config_file = os.path.join(path, CONFIG_NAME)
    weights_tmp = temporary_name(path, WEIGHTS_NAME)
    config_tmp = temporary_name(path, CONFIG_NAME)
    backup = None
    try:
        save_file(tensors, weights_tmp,
                  metadata={"format": "pt", SETTINGS_METADATA_KEY: settings_record(config)})
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


# a temporary's name: ".<final name>[.old].<host>-<pid>-<16 hex digits>.tmp"
_FINAL_NAMES = "|".join(re.escape(name) for name in (CONFIG_NAME, WEIGHTS_NAME))
_TEMPORARY = re.compile(
    rf"\.(?:{_FINAL_NAMES})(?:\.old)?\.(?P<host>\w*)-(?P<pid>\d+)-[0-9a-f]{{16}}\.tmp", re.ASCII)


def _host():
    """This host's name as it goes into a temporary's name (letters, digits, '_')."""
    return re.sub(r"\W", "_", socket.gethostname(), flags=re.ASCII)[:40]


def temporary_name(directory, name):
    """An unused name beside ``name`` that says which process writes it: os.replace is
    then a rename within one filesystem, which is atomic, and a later save can tell a
    killed save's leftovers from a running save's files. Only a name: whoever writes
    the file creates it, with the usual permissions (mkstemp's would be owner-only)."""
    return os.path.join(directory, f".{name}.{_host()}-{os.getpid()}-{secrets.token_hex(8)}.tmp")


def remove_stale_temporaries(directory):
    """Remove the temporaries that saves killed on this host left in ``directory``: those
    whose process is no longer running. Returns their names."""
    if not os.path.isdir(directory):
        return []
    removed = []
    host = _host()
    for name in sorted(os.listdir(directory)):
        match = _TEMPORARY.fullmatch(name)
        if match is None or match["host"] != host or _is_running(int(match["pid"])):
            continue
        try:
            os.remove(os.path.join(directory, name))
        except FileNotFoundError:  # another save removed it first
            continue
        removed.append(name)
    return removed


def _is_running(pid):
    """Whether process ``pid`` may still be running (True where this cannot be told)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def _backup_of(file, directory):
    """A second name for ``file`` (a hard link, or a copy where links are not
    supported), or None when there is no such file."""
    if not os.path.exists(file):
        return None
    backup = temporary_name(directory, os.path.basename(file) + ".old")
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
