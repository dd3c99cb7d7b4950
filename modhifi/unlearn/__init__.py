"""ModHiFi-U, class unlearning without fine-tuning (method.md §4): forget-class statistics ->
contrastive centred saliency -> plan (layers and k chosen on calibration images) -> edit -> audit.

1. **Layers** (`layers`): the last `MAX_LAYERS` scorable layers before the classifier, and the
   output positions of each that reach the head (`reaching_positions`: in a ViT's last block
   that is the class token alone).
2. **Scores** (`scores`): one forward pass over calibration data gives the input moments on the
   forget-class samples and on a seeded reference sample of all classes (the class label only
   selects the forget samples; no loss, no gradients). The centred saliency
   r_ci = E_forget⟨Y_c − m_c, A_ci − m_ci⟩, means m over all classes, so that what every class
   shares cancels (method.md §4.2); by default minus the same expectation over all classes
   (`contrastive`), so that variation every class shows cancels too.
3. **Plan** (`plan`, `search`): the top-k (output c, input i) pairs of each of the last L
   scored layers, k a share of the layer's c_out·c_in pairs. Unless given, `choose_plan` picks
   for each L the smallest k that takes the accuracy on the forget-class *calibration* samples
   down to a target, and keeps the L whose edit changes the fewest predictions on calibration
   samples of the other classes (compared with the unedited model: no labels are read). The
   test split is never looked at.
4. **Edit** (`plan.apply_plan`): zero the kernel slices W[c, i] (BatchNorm networks) or negate
   them (LayerNorm / residual networks, where the skip path would otherwise carry the class
   through), on a copy: the input model is never modified.
5. **Audit** (`run.unlearn` with `modhifi.audit`, where labels are allowed): forget, retain,
   test and per-class accuracy on the test split, a membership-inference attack on the forget
   class and a linear probe on penultimate features.

For Transformers whose head reads a token, `direction` holds a second edit: one neuron of the
last feed-forward layer made a gate on the class's discriminant direction (statistics →
direction → threshold and strength chosen on calibration images → edit), where the pair edits
leave classes behind (docs/results.md, issue 16).
"""
from modhifi.unlearn.direction import (ClassDirection, DirectionPlan, apply_direction,
                                       class_direction, discriminant, plan_direction)
from modhifi.unlearn.layers import (MAX_LAYERS, automatic_edit, default_edit, editable_layers,
                                    reaching_positions, unlearnable_layers)
from modhifi.unlearn.plan import LayerEdit, UnlearnPlan, apply_plan, edit_in_place, plan_unlearning
from modhifi.unlearn.run import UnlearnResult, unlearn
from modhifi.unlearn.scores import (ForgetScores, centred_forget_second, reference_index,
                                    score_forget_class)
from modhifi.unlearn.search import (K_GRID, K_MARGIN, K_REFINE_STEPS, EditSearch, choose_plan,
                                    other_classes)

__all__ = ["K_GRID", "K_MARGIN", "K_REFINE_STEPS", "MAX_LAYERS", "ClassDirection",
           "DirectionPlan", "EditSearch", "ForgetScores", "LayerEdit", "apply_direction",
           "class_direction", "discriminant", "plan_direction", "UnlearnPlan", "UnlearnResult",
           "apply_plan", "automatic_edit", "centred_forget_second", "choose_plan", "default_edit",
           "edit_in_place", "editable_layers", "other_classes", "plan_unlearning",
           "reaching_positions", "reference_index", "score_forget_class", "unlearn",
           "unlearnable_layers"]
