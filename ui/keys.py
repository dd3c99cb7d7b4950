"""Every session-state and widget key of the dashboard, defined once (prefixed by page).

Pages and the sidebar name keys only through these constants; tests and benchmarks set the
same strings (e.g. `app.session_state["sidebar.model"]`), so a value changes only with them.
"""

# --- the sidebar ---------------------------------------------------------------------------------
MODEL = "sidebar.model"
DEVICE = "sidebar.device"
CALIBRATION = "sidebar.calibration"
CHECKPOINT_PATH = "sidebar.checkpoint_path"
CHECKPOINT_ARCH = "sidebar.checkpoint_arch"
CHECKPOINT_DATA = "sidebar.checkpoint_data"
CHECKPOINT_UPLOAD = "sidebar.checkpoint_upload"

# --- Overview ------------------------------------------------------------------------------------
OVERVIEW_BATCH = "overview.batch"

# --- Fidelity ------------------------------------------------------------------------------------
FIDELITY_SCORE = "fidelity.score"
FIDELITY_LAYER = "fidelity.layer"
FIDELITY_OUTPUT = "fidelity.output"
FIDELITY_TARGET = "fidelity.target"
FIDELITY_COMPONENTS = "fidelity.components"
FIDELITY_CHANNEL = "fidelity.channel"        # the channel card's input channel
FIDELITY_REMOVE_ONE = "fidelity.remove_one"  # the card's "remove only this channel"

# --- Prune ---------------------------------------------------------------------------------------
PRUNE_TARGET = "prune.target"
PRUNE_KIND = "prune.kind"
PRUNE_ALLOCATION = "prune.allocation"
PRUNE_SCOPE = "prune.scope"
PRUNE_ROUND_TO = "prune.round_to"
PRUNE_METHOD = "prune.method"
PRUNE_COMPENSATION = "prune.compensation"
PRUNE_RECALIBRATE = "prune.recalibrate"
PRUNE_FULL = "prune.full"
PRUNE_SPEED = "prune.speed"
PRUNE_SEQUENTIAL = "prune.sequential"
PRUNE_CURVE = "prune.curve"
PRUNE_OVERRIDES = "prune.overrides"              # per-group shares removed whatever the target
PRUNE_OVERRIDES_FOR = "prune.overrides_for"  # (model, scope) whose group table was edited
PRUNE_COLOUR = "prune.colour"                    # what fills the architecture's layers
PRUNE_ALONE = "prune.alone"                      # measure each group pruned alone
PRUNE_LAYER_TIME = "prune.layer_time"            # time each layer
PRUNE_DOWNLOAD_MODEL = "prune.download_model"
PRUNE_DOWNLOAD_JSON = "prune.download_json"
PRUNE_DOWNLOAD_CSV = "prune.download_csv"
PRUNE_COMPONENTS = "prune.components"   # text models: FFN neurons or attention heads
PRUNE_TRY_IT = "prune.try_it"           # text models: a sentence to search the quotations with
HISTORY = "prune.history"               # this session's runs (ui/history.py), not a widget
HISTORY_TABLE = "prune.history_table"   # the run table, whose picked rows are compared

# --- Unlearn (the controls sit in a form: they take effect on submit) ----------------------------
UNLEARN_FORM = "unlearn.form"
UNLEARN_CLASS = "unlearn.class"
UNLEARN_LAYERS = "unlearn.layers"
UNLEARN_AUTO = "unlearn.auto"
UNLEARN_K = "unlearn.k"
UNLEARN_EDIT = "unlearn.edit"
UNLEARN_TARGET = "unlearn.target"
UNLEARN_SUBMIT = "unlearn.submit"
UNLEARN_DOWNLOAD = "unlearn.download"
UNLEARN_TRY_IT = "unlearn.try_it"         # text models: a sentence to search the quotations with

# --- Theory --------------------------------------------------------------------------------------
THEORY_LAYER = "theory.layer"
