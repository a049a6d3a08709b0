// Drawing pad (pointer events: mouse, touch and pen), file upload, and the prediction display.
"use strict";

const pad = document.getElementById("pad");
const context = pad.getContext("2d");
const predictButton = document.getElementById("predict");
const fileInput = document.getElementById("file");
const preview = document.getElementById("preview");
const labelView = document.getElementById("label");
const confidenceView = document.getElementById("confidence");
const errorView = document.getElementById("error");
const verdictView = document.getElementById("verdict");
const noteView = document.getElementById("note");
const versionView = document.getElementById("version");
const bars = Array.from(document.querySelectorAll("#bars li"));
const feedbackView = document.getElementById("feedback");
const thanksView = document.getElementById("thanks");
const choices = Array.from(document.querySelectorAll("#feedback .choice"));
let predictionId = null;  // the answer on show, as the server logged it (null: the log is off)

let drawing = false;
let last = null;
let inked = false;

function clearPad() {
  context.fillStyle = "#000";
  context.fillRect(0, 0, pad.width, pad.height);
  inked = false;
}

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: (event.clientX - box.left) * (pad.width / box.width),
    y: (event.clientY - box.top) * (pad.height / box.height),
  };
}

function strokeTo(point) {
  context.strokeStyle = "#fff";
  context.lineWidth = 18;
  context.lineCap = "round";
  context.lineJoin = "round";
  context.beginPath();
  context.moveTo(last.x, last.y);
  context.lineTo(point.x + 0.01, point.y);  // a click still leaves a dot
  context.stroke();
  last = point;
  inked = true;
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  last = padPoint(event);
  strokeTo(last);
});
pad.addEventListener("pointermove", (event) => {
  if (drawing) strokeTo(padPoint(event));
});
for (const name of ["pointerup", "pointercancel"]) {
  pad.addEventListener(name, () => { drawing = false; });
}

function hideFeedback() {
  predictionId = null;
  feedbackView.hidden = true;
  thanksView.hidden = true;
  choices.forEach((choice) => { choice.disabled = false; choice.classList.remove("chosen"); });
}

function offerFeedback(id) {
  hideFeedback();
  predictionId = id || null;
  feedbackView.hidden = !predictionId;
}

async function sendFeedback(choice) {
  if (!predictionId) return;
  choices.forEach((other) => { other.disabled = true; other.classList.toggle("chosen", other === choice); });
  const label = choice.dataset.label;
  try {
    const response = await fetch("/feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id: predictionId, label: label === "not-digit" ? label : Number(label) }),
    });
    let answer = null;
    try { answer = await response.json(); } catch (_) { answer = null; }
    thanksView.textContent = response.ok
      ? `Thank you: noted as ${label === "not-digit" ? "not a digit" : label}. You can change it.`
      : `Not saved: ${(answer && answer.error) || `the server answered ${response.status}`}`;
  } catch (error) {
    thanksView.textContent = `Not saved: could not reach the server (${error.message})`;
  }
  thanksView.hidden = false;
  choices.forEach((other) => { other.disabled = false; });
}

choices.forEach((choice) => choice.addEventListener("click", () => sendFeedback(choice)));

function showError(message) {
  hideFeedback();
  verdictView.hidden = true;
  labelView.classList.remove("closest");
  errorView.textContent = message;
  errorView.hidden = false;
}

function showResult(result) {
  errorView.hidden = true;
  const notDigit = result.is_digit === false;
  labelView.textContent = String(result.label);
  labelView.classList.toggle("closest", notDigit);
  verdictView.hidden = !notDigit;
  const sure = `${(result.confidence * 100).toFixed(1)}%`;
  confidenceView.textContent = notDigit ? `closest guess: ${result.label} (${sure})` : `${sure} sure`;
  versionView.textContent = result.model_version ? `, version ${result.model_version} answered` : "";
  noteView.hidden = !result.digit_check;
  noteView.textContent = result.digit_check || "";
  bars.forEach((bar, digit) => {
    const p = result.probabilities[digit];
    bar.querySelector(".fill").style.width = `${(p * 100).toFixed(1)}%`;
    bar.querySelector(".value").textContent = `${(p * 100).toFixed(1)}%`;
    bar.classList.toggle("top", digit === result.label && !notDigit);
  });
  offerFeedback(result.prediction_id);
}

async function send(body, headers) {
  predictButton.disabled = true;
  labelView.textContent = "…";
  try {
    const response = await fetch("/api/predict", { method: "POST", body, headers });
    let answer = null;
    try { answer = await response.json(); } catch (_) { answer = null; }
    if (!response.ok) {
      labelView.textContent = "?";
      showError((answer && answer.error) || `the server answered ${response.status}`);
      return;
    }
    showResult(answer);
  } catch (error) {
    labelView.textContent = "?";
    showError(`could not reach the server (${error.message})`);
  } finally {
    predictButton.disabled = false;
  }
}

predictButton.addEventListener("click", () => {
  if (!inked) {
    showError("draw a digit first");
    return;
  }
  send(JSON.stringify({ image: pad.toDataURL("image/png") }), { "Content-Type": "application/json" });
});

document.getElementById("clear").addEventListener("click", () => {
  clearPad();
  hideFeedback();
  errorView.hidden = true;
  verdictView.hidden = true;
  labelView.classList.remove("closest");
  labelView.textContent = "?";
  confidenceView.textContent = "draw a digit, then Predict";
  showBarsEmpty();
});

function showBarsEmpty() {
  bars.forEach((bar) => {
    bar.querySelector(".fill").style.width = "0%";
    bar.querySelector(".value").textContent = "–";
    bar.classList.remove("top");
  });
}

fileInput.addEventListener("change", () => {
  const file = fileInput.files[0];
  if (!file) return;
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("image", file);
  send(form, {});
});

clearPad();
