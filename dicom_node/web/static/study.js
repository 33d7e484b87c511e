// Switch the study page's heatmap without reloading: swap the image's source and the finding
// named in the caption.  Only #heatmap-label changes: the decision-support notice and any
// UNTRAINED / UNVERIFIED warning next to it in #heatmap-caption stay on screen.
document.addEventListener("DOMContentLoaded", function () {
  var image = document.getElementById("study-image");
  var label = document.getElementById("heatmap-label");
  var links = document.querySelectorAll("[data-heatmap]");
  if (!image || !label) { return; }  // image purged by retention: nothing to switch
  links.forEach(function (link) {
    link.addEventListener("click", function (event) {
      event.preventDefault();
      image.src = link.getAttribute("href");
      image.dataset.finding = link.dataset.heatmap;
      label.textContent = link.dataset.caption;
      links.forEach(function (other) { other.classList.toggle("active", other === link); });
    });
  });
});
