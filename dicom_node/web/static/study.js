// Switch the study page's heatmap without reloading: swap the image's source.
document.addEventListener("DOMContentLoaded", function () {
  var image = document.getElementById("study-image");
  var caption = document.getElementById("heatmap-caption");
  var links = document.querySelectorAll("[data-heatmap]");
  links.forEach(function (link) {
    link.addEventListener("click", function (event) {
      event.preventDefault();
      image.src = link.getAttribute("href");
      image.dataset.finding = link.dataset.heatmap;
      caption.textContent = link.dataset.caption;
      links.forEach(function (other) { other.classList.toggle("active", other === link); });
    });
  });
});
